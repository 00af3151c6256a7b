"""The chunkserver (spy_server): supervisor, writer, workers, reader, reporter.

    supervisor ──fork──> writer   (store/: the only process writing chunk files)
               ──fork──> workers  (gevent, protocol; shm/: pool, fid index, counters)
"""
