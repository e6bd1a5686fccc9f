"""scancache's service side: the preprocessing job, the store writer and the data server."""
