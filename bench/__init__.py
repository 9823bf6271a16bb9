"""Benchmarks of the gateway against the mock upstream.

bench.gateway (`make bench`): added latency, throughput, and long concurrent streams.
bench.profile: where a gateway worker's CPU goes per request, recorded with py-spy.
bench.load: the load generators both run in separate processes; bench.stack: the stack.
"""
