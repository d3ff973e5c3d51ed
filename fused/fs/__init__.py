"""The served files: <run_dir>/fs/<name>/{hosts,ports,env,resolv.conf}.

    wire.py      the FUSE protocol, sans-IO (bytes in, bytes out)
    handlers.py  the filesystem over a published snapshot; inodes from names
    server.py    the file server process (<run_dir>/fsd.pid): the FUSE loop
    session.py   tether-fused's side: mount, fd hand-over, publish, watch

Importing this package imports nothing else: the file server starts with the
standard library only.
"""
