"""DNS for the containers: A, SRV and PTR per asking container, answered on
the bridge gateway by a process of its own that outlives tether-fused.

    budget.py      pure: each source address's token bucket, checked before parsing
    answer.py      sans-IO: a query's bytes and source in, the answer's bytes out
                   (or "forward it"), over the DnsData tether-fused published
    forward.py     sans-IO: the queries in flight to the upstreams
    server.py      the DNS process (<run_dir>/dns.pid): thin loops around the three
    supervisor.py  tether-fused's side: the sockets, the process, publishing DnsData

Importing this package imports nothing else.
"""
