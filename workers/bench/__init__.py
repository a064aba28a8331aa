"""Benchmarks behind `rtrec bench ...`: they print figures, they are not tests.

ingest (state-worker throughput and event->visible latency), generate (model throughput and
request->response over Kafka), hotswap (latency through promotions), soak (minutes of mixed load:
lost/duplicated counts and memory growth) and memory (Redis bytes per event, user and item).
stack_load holds what several of them share to put load on a running stack.
"""
