/* _segcore: the per-segment data path of format/segment.py in C, with the GIL released for the
 * heavy part (issue 15): xxh3-128, the zero test, encode (compressibility sample, zstd, verify
 * before store) and decode (the checks of segment.decode, decompression, re-hash).
 *
 * Byte-identical to the pure-Python path of segment.py, which stays and is tested against this
 * one (tests/unit/test_segment_native.py):
 *   - xxh3-128 is XXH3_128bits with seed 0, canonical (big-endian) bytes: what
 *     xxhash.xxh3_128_digest returns (xxhash.h from libxxhash-dev, inlined: no library to link);
 *   - zstd frames come from the same calls python-zstandard's ZstdCompressor(level=L).compress()
 *     makes (parameters level, content size on, checksum off, dict id on; pledged size; one
 *     ZSTD_compressStream2(ZSTD_e_end)), against the same libzstd: Debian's libzstd1, which
 *     Debian's python3-zstandard links too (scripts/install-deps.sh). Same library, same calls,
 *     same bytes; a test asserts the two libraries' versions are equal;
 *   - decoding uses the calls of ZstdDecompressor().decompress() (ZSTD_decompressStream on a
 *     default context: same window limit, same errors).
 *
 * No error message is made here: failures are small integer codes (the E_* below), which
 * segment.py turns into the very messages its Python path raises. Buffers come in through the
 * buffer protocol (bytes, bytearray, memoryview) and are released before returning: the reader's
 * pooled bytearrays are never held past the call.
 *
 * Also AES-256-GCM seal/open of crypto.SealedCodec's envelopes (OpenSSL's libcrypto), GIL
 * released too, byte-identical to cryptography's AESGCM.
 *
 * zstd contexts and scratch memory are per thread (a pthread key whose destructor frees them
 * when the thread ends): a context is not thread-safe, and allocating one per segment costs more
 * than the compression of a small one.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdint.h>
#include <string.h>

/* ZSTD_frameHeaderSize (what zstandard.frame_header_size calls) is in zstd's "experimental"
 * section; Debian's libzstd.so exports it, and its version is pinned by the test of equal versions. */
#define ZSTD_STATIC_LINKING_ONLY
#include <zstd.h>
#include <zstd_errors.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <openssl/evp.h>

#define HEADER_SIZE 28
#define DIGEST_SIZE 16
#define COMP_NONE 0
#define COMP_ZSTD 1
#define HASH_XXH3_128 1
#define SAMPLE (16 * 1024)
/* Below this, releasing and re-taking the GIL costs more than the work. */
#define NOGIL_MIN (16 * 1024)

/* Decode / verify outcomes, in the order segment.decode checks them. Keep in sync with segment.py. */
enum {
    E_OK = 0,
    E_TRUNCATED = 1,      /* shorter than the header */
    E_MAGIC = 2,          /* bad magic or hash id */
    E_RESERVED = 3,       /* reserved field not 0 */
    E_NAME = 4,           /* header digest is not the expected name (plain codec) */
    E_FRAME = 5,          /* not a zstd frame (zstd's header functions fail, block cut short or reserved) */
    E_FRAME_HEADER = 6,   /* frame content size != raw length, or the descriptor's unused bit set */
    E_AFTER_FRAME = 7,    /* the frame does not end exactly at the payload's end */
    E_DECOMPRESS = 8,     /* ZSTD_decompressStream failed or did not finish the frame */
    E_COMP = 9,           /* unknown compression id */
    E_CONTENT = 10,       /* length or xxh3-128 of the result does not match */
    E_STORED = 11,        /* encode: the uncompressed payload does not hash to its digest */
};

/* -- per-thread state ------------------------------------------------------------------------ */

typedef struct {
    ZSTD_CCtx *cctx;
    ZSTD_DCtx *dctx;
    char *scratch;          /* the decoded bytes of verify-before-store */
    size_t scratch_cap;
    char *packed;           /* zstd's output, at compressBound: kept only when it saves 1/32 */
    size_t packed_cap;
    char *sample;           /* three samples joined, then their compressed form */
    size_t sample_cap;
} ThreadState;

static pthread_key_t state_key;

static void state_free(void *p) {
    ThreadState *t = p;
    if (!t)
        return;
    ZSTD_freeCCtx(t->cctx);
    ZSTD_freeDCtx(t->dctx);
    free(t->scratch);
    free(t->packed);
    free(t->sample);
    free(t);
}

/* Without the GIL. NULL when out of memory. */
static ThreadState *state_get(void) {
    ThreadState *t = pthread_getspecific(state_key);
    if (t)
        return t;
    t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->cctx = ZSTD_createCCtx();
    t->dctx = ZSTD_createDCtx();
    if (!t->cctx || !t->dctx || pthread_setspecific(state_key, t) != 0) {
        state_free(t);
        return NULL;
    }
    return t;
}

static int grow(char **buf, size_t *cap, size_t need) {
    if (*cap >= need)
        return 0;
    char *p = realloc(*buf, need ? need : 1);
    if (!p)
        return -1;
    *buf = p;
    *cap = need;
    return 0;
}

/* -- the GIL-free pieces ----------------------------------------------------------------------- */

/* Calls that run without the GIL right now, and how many have started: what a test watches to
 * see that another thread runs Python code while one of these is in progress. */
static volatile long heavy_now, heavy_started;

static void heavy_enter(void) {
    __atomic_add_fetch(&heavy_started, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&heavy_now, 1, __ATOMIC_SEQ_CST);
}

static void heavy_leave(void) { __atomic_sub_fetch(&heavy_now, 1, __ATOMIC_SEQ_CST); }

static void xxh3_128(const void *p, size_t n, unsigned char out[DIGEST_SIZE]) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(p, n));
    memcpy(out, c.digest, DIGEST_SIZE);
}

static int all_zero(const unsigned char *p, size_t n) {
    size_t head = n < 16 ? n : 16;
    for (size_t i = 0; i < head; i++)
        if (p[i])
            return 0;
    /* the first 16 bytes are zero, and every byte equals the one 16 before it */
    return n <= 16 || memcmp(p, p + 16, n - 16) == 0;
}

/* One frame exactly as ZstdCompressor(level=level).compress(src) makes it. Returns its size, or
 * a zstd error code (ZSTD_isError). */
static size_t zcompress(ZSTD_CCtx *c, int level, void *dst, size_t cap, const void *src, size_t n) {
    size_t r;
    ZSTD_CCtx_reset(c, ZSTD_reset_session_and_parameters);
    if (ZSTD_isError(r = ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, level)) ||
        ZSTD_isError(r = ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, 1)) ||
        ZSTD_isError(r = ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 0)) ||
        ZSTD_isError(r = ZSTD_CCtx_setParameter(c, ZSTD_c_dictIDFlag, 1)) ||
        ZSTD_isError(r = ZSTD_CCtx_setPledgedSrcSize(c, n)))
        return r;
    ZSTD_inBuffer in = {src, n, 0};
    ZSTD_outBuffer out = {dst, cap, 0};
    r = ZSTD_compressStream2(c, &out, &in, ZSTD_e_end);
    if (ZSTD_isError(r))
        return r;
    if (r != 0)                       /* a partial flush: cap < ZSTD_compressBound(n) */
        return (size_t)-ZSTD_error_dstSize_tooSmall;
    return out.pos;
}

/* segment._compressible: three 16 KiB samples (start, middle, end) joined must compress by
 * MIN_SAVING (1/32); segments under 8 samples are always tried. 1: try, 0: do not, -1: no
 * memory, -2: zstd failed (*zerr). */
static int compressible(ThreadState *t, int level, const char *raw, size_t n, size_t *zerr) {
    if (n < 8 * SAMPLE)
        return 1;
    size_t joined = 3 * SAMPLE, bound = ZSTD_compressBound(joined);
    if (grow(&t->sample, &t->sample_cap, joined + bound))
        return -1;
    size_t mid = (n / 2) & ~(size_t)(SAMPLE - 1);
    memcpy(t->sample, raw, SAMPLE);
    memcpy(t->sample + SAMPLE, raw + mid, SAMPLE);
    memcpy(t->sample + 2 * SAMPLE, raw + n - SAMPLE, SAMPLE);
    size_t r = zcompress(t->cctx, level, t->sample + joined, bound, t->sample, joined);
    if (ZSTD_isError(r)) {
        *zerr = r;
        return -2;
    }
    /* len(compressed) <= len(sample) * (1 - 1/32), exactly (the float product is exact) */
    return 32 * r <= 31 * joined;
}

/* segment._reserved_modes: whether the compressed block f[start:start + size] sets the reserved
 * bits of its Symbol_Compression_Modes (RFC 8878 3.1.1.3.2.1), which zstd 1.5.4 ignores. */
static int reserved_modes(const unsigned char *f, size_t flen, size_t start, size_t size) {
    size_t end = start + size < flen ? start + size : flen, literals;
    if (start >= end)
        return 0;
    unsigned b0 = f[start], kind = b0 & 3, size_format = (b0 >> 2) & 3;
    uint64_t v = 0;
    if (kind < 2) {
        static const size_t hdrs[4] = {1, 2, 1, 3};
        size_t hdr = hdrs[size_format];
        if (start + hdr > end)
            return 0;
        for (size_t i = 0; i < hdr; i++)
            v |= (uint64_t)f[start + i] << (8 * i);
        uint64_t regenerated = hdr == 1 ? v >> 3 : v >> 4;
        literals = hdr + (kind == 0 ? regenerated : 1);
    } else {
        static const size_t hdrs[4] = {3, 3, 4, 5}, bits[4] = {10, 10, 14, 18};
        size_t hdr = hdrs[size_format], nb = bits[size_format];
        if (start + hdr > end)
            return 0;
        for (size_t i = 0; i < hdr; i++)
            v |= (uint64_t)f[start + i] << (8 * i);
        literals = hdr + ((v >> (4 + nb)) & ((1u << nb) - 1));
    }
    size_t p = start + literals;
    if (p >= end || f[p] == 0)
        return 0;
    p += f[p] < 128 ? 1 : f[p] < 255 ? 2 : 3;
    return p < end && (f[p] & 3) != 0;
}

typedef struct {
    int comp;
    uint32_t length;
    const unsigned char *stored;   /* the header's digest */
    const unsigned char *payload;
    size_t payload_len;
} Parsed;

/* The checks segment.decode makes before it decompresses, in its order. `expected` NULL: an
 * encrypting codec (the header's digest is what the content must hash to). */
static int check_object(const unsigned char *b, size_t len, const unsigned char *expected, Parsed *p) {
    if (len < HEADER_SIZE)
        return E_TRUNCATED;
    if (memcmp(b, "EKS1", 4) != 0 || b[5] != HASH_XXH3_128)
        return E_MAGIC;
    if (b[6] || b[7])
        return E_RESERVED;
    p->comp = b[4];
    p->length = (uint32_t)b[8] | (uint32_t)b[9] << 8 | (uint32_t)b[10] << 16 | (uint32_t)b[11] << 24;
    p->stored = b + 12;
    if (expected && memcmp(p->stored, expected, DIGEST_SIZE) != 0)
        return E_NAME;
    p->payload = b + HEADER_SIZE;
    p->payload_len = len - HEADER_SIZE;
    if (p->comp == COMP_ZSTD) {
        /* segment._check_frame: zstandard.frame_content_size, then segment.frame_size */
        const unsigned char *f = p->payload;
        size_t flen = p->payload_len;
        unsigned long long declared = ZSTD_getFrameContentSize(f, flen);
        if (declared == ZSTD_CONTENTSIZE_ERROR)
            return E_FRAME;
        size_t pos = ZSTD_frameHeaderSize(f, flen);
        if (ZSTD_isError(pos))
            return E_FRAME;
        for (;;) {
            if (pos + 3 > flen || pos + 3 < pos)
                return E_FRAME;
            uint32_t block = f[pos] | (uint32_t)f[pos + 1] << 8 | (uint32_t)f[pos + 2] << 16;
            pos += 3;
            uint32_t kind = (block >> 1) & 3;
            if (kind == 3)
                return E_FRAME;
            if (kind == 2 && reserved_modes(f, flen, pos, block >> 3))
                return E_FRAME;
            pos += kind == 1 ? 1 : block >> 3;
            if (block & 1) {
                pos += (f[4] & 4) ? 4 : 0;
                break;
            }
        }
        /* declared is -1 in Python for an unknown size: never a length */
        if (declared == ZSTD_CONTENTSIZE_UNKNOWN || declared != p->length || (f[4] & 0x10))
            return E_FRAME_HEADER;
        if (pos != flen)
            return E_AFTER_FRAME;
        return E_OK;
    }
    if (p->comp == COMP_NONE)
        return E_OK;
    return E_COMP;
}

/* Without the GIL: decompress (as ZstdDecompressor().decompress(payload, max_output_size=length)
 * does) into out[length], or copy the raw payload, then check length and digest. */
static int finish_decode(ZSTD_DCtx *d, const Parsed *p, const unsigned char *digest, char *out) {
    size_t got;
    if (p->comp == COMP_ZSTD) {
        if (p->length == 0) {
            got = 0;                  /* zstandard returns b"" for a frame that declares 0 bytes */
        } else {
            ZSTD_DCtx_reset(d, ZSTD_reset_session_only);
            ZSTD_inBuffer in = {p->payload, p->payload_len, 0};
            ZSTD_outBuffer o = {out, p->length, 0};
            size_t r = ZSTD_decompressStream(d, &o, &in);
            if (ZSTD_isError(r) || r != 0)
                return E_DECOMPRESS;
            got = o.pos;
        }
    } else {
        got = p->payload_len;
        if (got == p->length)
            memcpy(out, p->payload, got);
    }
    if (got != p->length)
        return E_CONTENT;
    unsigned char h[DIGEST_SIZE];
    xxh3_128(out, got, h);
    return memcmp(h, digest, DIGEST_SIZE) == 0 ? E_OK : E_CONTENT;
}

/* -- Python functions -------------------------------------------------------------------------- */

static PyObject *py_xxh3_128(PyObject *self, PyObject *arg) {
    Py_buffer b;
    unsigned char h[DIGEST_SIZE];
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    if (b.len >= NOGIL_MIN) {
        Py_BEGIN_ALLOW_THREADS
        heavy_enter();
        xxh3_128(b.buf, (size_t)b.len, h);
        heavy_leave();
        Py_END_ALLOW_THREADS
    } else {
        xxh3_128(b.buf, (size_t)b.len, h);
    }
    PyBuffer_Release(&b);
    return PyBytes_FromStringAndSize((const char *)h, DIGEST_SIZE);
}

static PyObject *py_is_zero(PyObject *self, PyObject *arg) {
    Py_buffer b;
    int z;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    if (b.len >= NOGIL_MIN) {
        Py_BEGIN_ALLOW_THREADS
        heavy_enter();
        z = all_zero(b.buf, (size_t)b.len);
        heavy_leave();
        Py_END_ALLOW_THREADS
    } else {
        z = all_zero(b.buf, (size_t)b.len);
    }
    PyBuffer_Release(&b);
    return PyBool_FromLong(z);
}

static int get_digest(PyObject *o, const unsigned char **out, const char *what) {
    if (o == Py_None) {
        *out = NULL;
        return 0;
    }
    if (!PyBytes_Check(o) || PyBytes_GET_SIZE(o) != DIGEST_SIZE) {
        PyErr_Format(PyExc_TypeError, "%s must be %d bytes or None", what, DIGEST_SIZE);
        return -1;
    }
    *out = (const unsigned char *)PyBytes_AS_STRING(o);
    return 0;
}

static PyObject *zstd_failure(const char *what, size_t r) {
    return PyErr_Format(PyExc_RuntimeError, "zstd %s failed: %s", what, ZSTD_getErrorName(r));
}

/* encode(raw, level, compress, digest) -> (digest, blob, code)
 *
 * The object of segment.encode: header | payload, zstd when it saves 1/32 (and the samples say
 * it is worth trying), then decoded and re-hashed (verify before store). `digest` is the
 * header's xxh3-128 when the caller has it (None: computed here). code is E_OK, or why the
 * verification failed (the blob is returned anyway, for the message). */
static PyObject *py_encode(PyObject *self, PyObject *args) {
    Py_buffer raw;
    int level, compress;
    PyObject *digest_obj;
    const unsigned char *given;
    if (!PyArg_ParseTuple(args, "y*ipO:encode", &raw, &level, &compress, &digest_obj))
        return NULL;
    if (get_digest(digest_obj, &given, "digest") < 0 || raw.len > UINT32_MAX) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "a segment is at most 4 GiB - 1");
        PyBuffer_Release(&raw);
        return NULL;
    }
    const char *src = raw.buf;
    size_t n = (size_t)raw.len;
    /* Exactly the object of a segment stored as is: a frame is kept only when it is smaller.
     * zstd writes into per-thread memory at compressBound (what python-zstandard gives it: the
     * frame depends on it), copied here when kept. A blob allocated at compressBound and shrunk
     * cost a fresh mmap and its page faults per segment (glibc's mmap threshold follows the
     * sizes freed): slower than the Python path on one thread, measured. */
    size_t bound = ZSTD_compressBound(n);
    PyObject *blob = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(HEADER_SIZE + n));
    if (!blob) {
        PyBuffer_Release(&raw);
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(blob);
    unsigned char d[DIGEST_SIZE];
    int comp = COMP_NONE, code = E_OK, fail = 0;   /* fail: 1 no memory, 2 zstd error */
    size_t payload_len = n, zerr = 0;

    Py_BEGIN_ALLOW_THREADS
    heavy_enter();
    ThreadState *t = state_get();
    if (!t) {
        fail = 1;
    } else {
        if (given)
            memcpy(d, given, DIGEST_SIZE);
        else
            xxh3_128(src, n, d);
        if (compress) {
            int c = compressible(t, level, src, n, &zerr);
            if (c < 0) {
                fail = c == -1 ? 1 : 2;
            } else if (c) {
                size_t r = 0;
                if (grow(&t->packed, &t->packed_cap, bound))
                    fail = 1;
                else
                    r = zcompress(t->cctx, level, t->packed, bound, src, n);
                if (fail) {
                } else if (ZSTD_isError(r)) {
                    fail = 2;
                    zerr = r;
                } else if (32 * r <= 31 * n) {   /* len(packed) <= len(raw) * (1 - 1/32) */
                    comp = COMP_ZSTD;
                    payload_len = r;
                    memcpy(out + HEADER_SIZE, t->packed, r);
                }
            }
        }
    }
    if (!fail) {
        memcpy(out, "EKS1", 4);
        out[4] = (unsigned char)comp;
        out[5] = HASH_XXH3_128;
        out[6] = out[7] = 0;
        out[8] = n & 0xff;
        out[9] = (n >> 8) & 0xff;
        out[10] = (n >> 16) & 0xff;
        out[11] = (n >> 24) & 0xff;
        memcpy(out + 12, d, DIGEST_SIZE);
        if (comp == COMP_NONE) {
            memcpy(out + HEADER_SIZE, src, n);
            unsigned char h[DIGEST_SIZE];
            xxh3_128(out + HEADER_SIZE, n, h);      /* re-hashed in place, as the Python path does */
            if (memcmp(h, d, DIGEST_SIZE) != 0)
                code = E_STORED;
        } else {
            /* segment.decode of what was built: the header against the digest, the frame, then
             * decompressed into scratch memory and re-hashed */
            Parsed p;
            code = check_object(out, HEADER_SIZE + payload_len, d, &p);
            if (code == E_OK) {
                if (grow(&t->scratch, &t->scratch_cap, n))
                    fail = 1;
                else
                    code = finish_decode(t->dctx, &p, d, t->scratch);
            }
        }
    }
    heavy_leave();
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&raw);
    if (fail) {
        Py_DECREF(blob);
        return fail == 1 ? PyErr_NoMemory() : zstd_failure("compression", zerr);
    }
    if (payload_len != n && _PyBytes_Resize(&blob, (Py_ssize_t)(HEADER_SIZE + payload_len)) < 0)
        return NULL;
    return Py_BuildValue("(y#Ni)", (const char *)d, (Py_ssize_t)DIGEST_SIZE, blob, code);
}

/* decode(blob, expected) -> bytes | int
 *
 * segment.decode's checks and result: the raw bytes, or the code of the first check that failed.
 * expected None: an encrypting codec (the content must hash to the header's digest). */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    Py_buffer b;
    PyObject *expected_obj;
    const unsigned char *expected;
    if (!PyArg_ParseTuple(args, "y*O:decode", &b, &expected_obj))
        return NULL;
    if (get_digest(expected_obj, &expected, "expected") < 0) {
        PyBuffer_Release(&b);
        return NULL;
    }
    Parsed p;
    int code = check_object(b.buf, (size_t)b.len, expected, &p);
    if (code == E_OK && p.comp == COMP_NONE && p.payload_len != p.length)
        code = E_CONTENT;
    if (code != E_OK) {
        PyBuffer_Release(&b);
        return PyLong_FromLong(code);
    }
    PyObject *raw = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)p.length);
    if (!raw) {
        PyBuffer_Release(&b);
        return NULL;
    }
    unsigned char digest[DIGEST_SIZE];
    memcpy(digest, p.stored, DIGEST_SIZE);     /* plain: equal to expected (checked above) */
    int nomem = 0;
    Py_BEGIN_ALLOW_THREADS
    heavy_enter();
    ThreadState *t = state_get();
    if (!t)
        nomem = 1;
    else
        code = finish_decode(t->dctx, &p, digest, PyBytes_AS_STRING(raw));
    heavy_leave();
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (nomem || code != E_OK) {
        Py_DECREF(raw);
        return nomem ? PyErr_NoMemory() : PyLong_FromLong(code);
    }
    return raw;
}

/* -- AES-256-GCM of crypto.SealedCodec (docs/format.md, "Sealed object") -------------------------
 *
 * OpenSSL's EVP AES-256-GCM (libcrypto, which Python's hashlib loads anyway), with the GIL
 * released: cryptography's AESGCM (44.x) holds it for the whole object. GCM is deterministic
 * given key, nonce and associated data, so the envelope is the one AESGCM makes; the nonce comes
 * from the caller (crypto.py: os.urandom), never from here. */

#define GCM_KEY 32
#define GCM_NONCE 12
#define GCM_TAG 16
#define SEAL_PREFIX 32        /* magic | fingerprint | nonce: the first associated data, in the object */

/* Without the GIL. 1: done (for open: the tag matched), 0: tag mismatch, -1: OpenSSL failed. */
static int gcm(int enc, const unsigned char *key, const unsigned char *nonce, const unsigned char *aad1,
               size_t aad1_len, const unsigned char *aad2, size_t aad2_len, const unsigned char *in,
               size_t n, unsigned char *out, unsigned char *tag) {
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int ok = -1, len;
    if (!c)
        return -1;
    if (EVP_CipherInit_ex(c, EVP_aes_256_gcm(), NULL, NULL, NULL, enc) != 1 ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, GCM_NONCE, NULL) != 1 ||
        EVP_CipherInit_ex(c, NULL, NULL, key, nonce, enc) != 1 ||
        EVP_CipherUpdate(c, NULL, &len, aad1, (int)aad1_len) != 1 ||
        (aad2_len && EVP_CipherUpdate(c, NULL, &len, aad2, (int)aad2_len) != 1))
        goto done;
    /* EVP_CipherUpdate takes an int length: feed at most 1 GiB at a time */
    for (size_t off = 0; off < n;) {
        size_t step = n - off < (1u << 30) ? n - off : (1u << 30);
        if (EVP_CipherUpdate(c, out + off, &len, in + off, (int)step) != 1)
            goto done;
        off += step;
    }
    if (enc) {
        if (EVP_CipherFinal_ex(c, out + n, &len) != 1 ||
            EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, GCM_TAG, tag) != 1)
            goto done;
        ok = 1;
    } else {
        if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, GCM_TAG, (void *)tag) != 1)
            goto done;
        ok = EVP_CipherFinal_ex(c, out + n, &len) == 1 ? 1 : 0;
    }
done:
    EVP_CIPHER_CTX_free(c);
    return ok;
}

static int get_exact(Py_buffer *b, PyObject *o, Py_ssize_t size, const char *what) {
    if (PyObject_GetBuffer(o, b, PyBUF_SIMPLE) < 0)
        return -1;
    if (size >= 0 && b->len != size) {
        PyErr_Format(PyExc_ValueError, "%s must be %zd bytes", what, size);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

/* gcm_seal(key, prefix, name, data) -> prefix | AES-256-GCM(key, nonce = prefix[20:32], data,
 * associated data = prefix | name) | tag: crypto.SealedCodec.seal's object. */
static PyObject *py_gcm_seal(PyObject *self, PyObject *args) {
    PyObject *ko, *po, *no, *dobj;
    Py_buffer key, prefix, name, data;
    if (!PyArg_ParseTuple(args, "OOOO:gcm_seal", &ko, &po, &no, &dobj))
        return NULL;
    if (get_exact(&key, ko, GCM_KEY, "key") < 0)
        return NULL;
    if (get_exact(&prefix, po, SEAL_PREFIX, "prefix") < 0) {
        PyBuffer_Release(&key);
        return NULL;
    }
    if (get_exact(&name, no, -1, "name") < 0) {
        PyBuffer_Release(&key);
        PyBuffer_Release(&prefix);
        return NULL;
    }
    if (get_exact(&data, dobj, -1, "data") < 0) {
        PyBuffer_Release(&key);
        PyBuffer_Release(&prefix);
        PyBuffer_Release(&name);
        return NULL;
    }
    size_t n = (size_t)data.len;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(SEAL_PREFIX + n + GCM_TAG));
    int ok = 0;
    if (out) {
        unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
        const unsigned char *p = prefix.buf;
        memcpy(o, p, SEAL_PREFIX);
        Py_BEGIN_ALLOW_THREADS
        heavy_enter();
        ok = gcm(1, key.buf, p + SEAL_PREFIX - GCM_NONCE, p, SEAL_PREFIX, name.buf, (size_t)name.len,
                 data.buf, n, o + SEAL_PREFIX, o + SEAL_PREFIX + n);
        heavy_leave();
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&key);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&name);
    PyBuffer_Release(&data);
    if (out && ok != 1) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-256-GCM encryption failed");
        return NULL;
    }
    return out;
}

/* gcm_open(key, aad_prefix, blob, name) -> the plaintext of the sealed object `blob`, or None when
 * its tag does not match: nonce = blob[20:32], ciphertext = blob[32:-16], tag = the last 16 bytes,
 * associated data = aad_prefix (normally blob[:32]) | name. */
static PyObject *py_gcm_open(PyObject *self, PyObject *args) {
    PyObject *ko, *po, *bo, *no;
    Py_buffer key, prefix, blob, name;
    if (!PyArg_ParseTuple(args, "OOOO:gcm_open", &ko, &po, &bo, &no))
        return NULL;
    if (get_exact(&key, ko, GCM_KEY, "key") < 0)
        return NULL;
    if (get_exact(&prefix, po, SEAL_PREFIX, "aad_prefix") < 0) {
        PyBuffer_Release(&key);
        return NULL;
    }
    if (get_exact(&blob, bo, -1, "blob") < 0) {
        PyBuffer_Release(&key);
        PyBuffer_Release(&prefix);
        return NULL;
    }
    if (get_exact(&name, no, -1, "name") < 0) {
        PyBuffer_Release(&key);
        PyBuffer_Release(&prefix);
        PyBuffer_Release(&blob);
        return NULL;
    }
    PyObject *out = NULL;
    int ok = -2;
    if (blob.len < SEAL_PREFIX + GCM_TAG) {
        PyErr_SetString(PyExc_ValueError, "a sealed object is at least 48 bytes");
    } else {
        size_t n = (size_t)blob.len - SEAL_PREFIX - GCM_TAG;
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
        if (out) {
            const unsigned char *b = blob.buf;
            unsigned char tag[GCM_TAG];
            memcpy(tag, b + SEAL_PREFIX + n, GCM_TAG);
            unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
            Py_BEGIN_ALLOW_THREADS
            heavy_enter();
            ok = gcm(0, key.buf, b + SEAL_PREFIX - GCM_NONCE, prefix.buf, SEAL_PREFIX, name.buf,
                     (size_t)name.len, b + SEAL_PREFIX, n, o, tag);
            heavy_leave();
            Py_END_ALLOW_THREADS
        }
    }
    PyBuffer_Release(&key);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&blob);
    PyBuffer_Release(&name);
    if (ok == 1)
        return out;
    Py_XDECREF(out);
    if (ok == 0)
        Py_RETURN_NONE;
    if (ok == -1)
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-256-GCM decryption failed");
    return NULL;
}

static PyObject *py_heavy(PyObject *self, PyObject *unused) {
    return Py_BuildValue("(ll)", __atomic_load_n(&heavy_now, __ATOMIC_SEQ_CST),
                         __atomic_load_n(&heavy_started, __ATOMIC_SEQ_CST));
}

static PyMethodDef methods[] = {
    {"xxh3_128", py_xxh3_128, METH_O, "xxh3_128(data) -> 16 bytes: xxhash.xxh3_128_digest(data)"},
    {"is_zero", py_is_zero, METH_O, "is_zero(data) -> True when every byte is 0"},
    {"encode", py_encode, METH_VARARGS,
     "encode(raw, level, compress, digest) -> (digest, blob, code): segment.encode's object"},
    {"decode", py_decode, METH_VARARGS,
     "decode(blob, expected) -> raw bytes, or the code of the check that failed"},
    {"gcm_seal", py_gcm_seal, METH_VARARGS,
     "gcm_seal(key, prefix, name, data) -> prefix | ciphertext | tag: crypto.SealedCodec.seal's object"},
    {"gcm_open", py_gcm_open, METH_VARARGS,
     "gcm_open(key, aad_prefix, blob, name) -> plaintext, or None when the tag does not match"},
    {"heavy", py_heavy, METH_NOARGS,
     "heavy() -> (calls running without the GIL now, calls started so far): for tests"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_segcore", "segment.py's data path in C, GIL released (issue 15)", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__segcore(void) {
    static int key_made;
    if (!key_made) {
        if (pthread_key_create(&state_key, state_free) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "pthread_key_create failed");
            return NULL;
        }
        key_made = 1;
    }
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    unsigned v = ZSTD_versionNumber();
    if (PyModule_AddObject(m, "ZSTD_VERSION", Py_BuildValue("(iii)", v / 10000, v / 100 % 100, v % 100)) < 0 ||
        PyModule_AddIntConstant(m, "XXH_VERSION", XXH_versionNumber()) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
