/* _directio: directio.py's whole-file write and read around the page cache, in C with the GIL
 * released (issue 15).
 *
 * Profiled on a full backup of the benchmark's workload W: the Python path held the GIL for
 * 0.5 s of its 1.5 s copying each segment object into the aligned bounce buffer, and each object
 * whose length is not a multiple of the block paid a padded last block and an ftruncate. Here:
 *
 *   write_new(path, data, direct, sync)  creates path (O_EXCL, 0600), writes data, fsyncs when
 *       asked. With direct, the block-aligned bulk goes through a per-thread page-aligned buffer
 *       with O_DIRECT, and the tail (< one block) through the page cache after O_DIRECT is cleared
 *       on the descriptor: the file's bytes are exactly data, no padding to cut back. On any
 *       failure the file is removed and OSError raised with the errno of the failing call (EINVAL
 *       from open: the file system refuses O_DIRECT; directio.py then writes through the cache).
 *   pwrite_direct(fd, data, offset)  directio.pwrite_direct: data at offset (a multiple of the
 *       block) of an O_DIRECT descriptor, through the aligned buffer, the last block padded with
 *       zeros (the caller cuts the file back if the padding must not stay): the restore's writes.
 *   read_direct(path, size)  the file's first `size` bytes read with O_DIRECT into the aligned
 *       buffer and copied into the bytes object returned (one copy, as directio.read_direct).
 *
 * Same results as the Python functions of directio.py (tests/unit/test_directio_native.py).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ALIGN 4096
#define CHUNK (2 << 20)         /* bytes per O_DIRECT call: directio.CHUNK */

static pthread_key_t buffer_key;

/* The calling thread's page-aligned CHUNK buffer (freed when the thread ends). Without the GIL. */
static char *aligned_buffer(void) {
    char *b = pthread_getspecific(buffer_key);
    if (b)
        return b;
    void *p = NULL;
    if (posix_memalign(&p, ALIGN, CHUNK) != 0)
        return NULL;
    if (pthread_setspecific(buffer_key, p) != 0) {
        free(p);
        return NULL;
    }
    return p;
}

/* 0 or an errno. */
static int pwrite_all(int fd, const char *p, size_t n, off_t off) {
    while (n) {
        ssize_t w = pwrite(fd, p, n, off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)
            return EIO;
        p += w;
        n -= (size_t)w;
        off += w;
    }
    return 0;
}

/* The aligned bulk with O_DIRECT through `buf`, the tail through the page cache. 0 or an errno. */
static int write_direct(int fd, const char *src, size_t n) {
    char *buf = aligned_buffer();
    if (!buf)
        return ENOMEM;
    size_t bulk = n / ALIGN * ALIGN;
    for (size_t off = 0; off < bulk; off += CHUNK) {
        size_t k = bulk - off < CHUNK ? bulk - off : CHUNK;
        memcpy(buf, src + off, k);
        int err = pwrite_all(fd, buf, k, (off_t)off);
        if (err)
            return err;
    }
    if (bulk == n)
        return 0;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_DIRECT) < 0)
        return errno;
    return pwrite_all(fd, src + bulk, n - bulk, (off_t)bulk);
}

/* 0 or the errno of the call that failed; the file does not exist afterwards unless 0. */
static int write_new_file(const char *path, const char *src, size_t n, int direct, int sync) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | (direct ? O_DIRECT : 0), 0600);
    if (fd < 0) {
        int err = errno;
        /* a file system that refuses O_DIRECT may refuse it after creating the file (O_EXCL: ours) */
        if (direct && err == EINVAL)
            unlink(path);
        return err;
    }
    int err = direct ? write_direct(fd, src, n) : pwrite_all(fd, src, n, 0);
    if (!err && sync && fsync(fd) != 0)
        err = errno;
    if (close(fd) != 0 && !err)
        err = errno;
    if (err)
        unlink(path);
    return err;
}

static PyObject *os_error(int err, PyObject *path) {
    errno = err;
    return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
}

/* write_new(path, data, direct, sync) -> None */
static PyObject *py_write_new(PyObject *self, PyObject *args) {
    PyObject *name, *path;
    Py_buffer data;
    int direct, sync, err;
    if (!PyArg_ParseTuple(args, "Oy*pp:write_new", &name, &data, &direct, &sync))
        return NULL;
    if (!PyUnicode_FSConverter(name, &path)) {
        PyBuffer_Release(&data);
        return NULL;
    }
    const char *p = PyBytes_AS_STRING(path);
    Py_BEGIN_ALLOW_THREADS
    err = write_new_file(p, data.buf, (size_t)data.len, direct, sync);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    Py_DECREF(path);
    return err ? os_error(err, name) : Py_NewRef(Py_None);
}

/* The chunks of src through the aligned buffer, the last one padded to ALIGN. 0 or an errno. */
static int pwrite_padded(int fd, const char *src, size_t n, off_t offset) {
    char *buf = aligned_buffer();
    if (!buf)
        return ENOMEM;
    for (size_t off = 0; off < n; off += CHUNK) {
        size_t k = n - off < CHUNK ? n - off : CHUNK;
        size_t padded = (k + ALIGN - 1) / ALIGN * ALIGN;
        memcpy(buf, src + off, k);
        memset(buf + k, 0, padded - k);
        int err = pwrite_all(fd, buf, padded, offset + (off_t)off);
        if (err)
            return err;
    }
    return 0;
}

/* pwrite_direct(fd, data, offset) -> None */
static PyObject *py_pwrite_direct(PyObject *self, PyObject *args) {
    int fd, err;
    Py_buffer data;
    long long offset;
    if (!PyArg_ParseTuple(args, "iy*L:pwrite_direct", &fd, &data, &offset))
        return NULL;
    if (offset < 0 || offset % ALIGN) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "the offset of an O_DIRECT write must be a multiple of 4096");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    err = pwrite_padded(fd, data.buf, (size_t)data.len, (off_t)offset);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* 0 or an errno; `out` gets exactly `size` bytes (EIO when the file is shorter). */
static int read_into(const char *path, char *out, size_t size) {
    char *buf = aligned_buffer();
    if (!buf)
        return ENOMEM;
    int fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0)
        return errno;
    int err = 0;
    size_t pos = 0;
    while (pos < size) {
        /* whole aligned blocks: the last read asks past the end and gets the file's tail */
        size_t left = size - pos, want = (left + ALIGN - 1) / ALIGN * ALIGN;
        if (want > CHUNK)
            want = CHUNK;
        ssize_t r = pread(fd, buf, want, (off_t)pos);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            err = r < 0 ? errno : EIO;
            break;
        }
        size_t k = (size_t)r < left ? (size_t)r : left;
        memcpy(out + pos, buf, k);
        pos += k;
    }
    close(fd);
    return err;
}

/* read_direct(path, size) -> bytes */
static PyObject *py_read_direct(PyObject *self, PyObject *args) {
    PyObject *name, *path;
    Py_ssize_t size;
    int err;
    if (!PyArg_ParseTuple(args, "On:read_direct", &name, &size))
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "size must be >= 0");
        return NULL;
    }
    if (!PyUnicode_FSConverter(name, &path))
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (!out) {
        Py_DECREF(path);
        return NULL;
    }
    const char *p = PyBytes_AS_STRING(path);
    char *dst = PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    err = read_into(p, dst, (size_t)size);
    Py_END_ALLOW_THREADS
    Py_DECREF(path);
    if (err) {
        Py_DECREF(out);
        out = os_error(err, name);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"write_new", py_write_new, METH_VARARGS,
     "write_new(path, data, direct, sync) -> None: directio.write_new_file, GIL released"},
    {"pwrite_direct", py_pwrite_direct, METH_VARARGS,
     "pwrite_direct(fd, data, offset) -> None: directio.pwrite_direct, GIL released"},
    {"read_direct", py_read_direct, METH_VARARGS,
     "read_direct(path, size) -> bytes: directio.read_direct, GIL released"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_directio", "directio.py's file writes and reads in C, GIL released (issue 15)", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__directio(void) {
    static int key_made;
    if (!key_made) {
        if (pthread_key_create(&buffer_key, free) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "pthread_key_create failed");
            return NULL;
        }
        key_made = 1;
    }
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "ALIGN", ALIGN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
