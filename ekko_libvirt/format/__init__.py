"""The store's formats: segment objects, manifests, how segments are named and sealed."""
