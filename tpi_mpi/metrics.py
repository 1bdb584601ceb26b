"""serve's numbers: `/metrics` in Prometheus' text format, and the counts the web page shows.

The HTTP front counts what its clients got: requests by how they ended, prompt and generated
tokens, the time to the first token and between tokens (from each token's arrival, HttpJob.token).
What the engine knows (the queue, the batch, the KV pool's blocks, each rank's memory, restarts) is
read from the front when scraped, so it is never stale by more than the engine's last report
(serving.REPORT_S). One registry per server, not prometheus_client's global one: two servers in one
process (the tests) keep their counts apart. No MPI and no torch here: the supervisor uses it too.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "tpi_mpi"
# how a request ended: its finish_reason, or why it got no (whole) answer
OUTCOMES = ("stop", "length", "cancelled", "refused", "invalid", "error")
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def outcome_of_status(status: int) -> str:
    """A request refused or failed before its answer ended, by its HTTP status."""
    if status == 499:
        return "cancelled"
    if status in (429, 503):
        return "refused"
    return "invalid" if status < 500 else "error"


class ServerMetrics:
    """The counters and histograms of one server, and a collector reading its front at scrape time."""

    def __init__(self, front) -> None:
        self.front = front
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Completion requests, by how they ended", ["outcome"], registry=r)
        for outcome in OUTCOMES:             # every series exists from the start, at 0
            self.requests.labels(outcome)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens read (requests that got a token)",
                                     registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated and sent", registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "From the request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.token_latency = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                                       "Between one generated token and the next", buckets=TOKEN_BUCKETS, registry=r)
        r.register(_FrontCollector(front))
        self.counts = {"requests": dict.fromkeys(OUTCOMES, 0), "prompt_tokens": 0, "generated_tokens": 0}

    def ended(self, job, outcome: str) -> None:
        """`job` has ended (counted once, whatever path ends it): its outcome, tokens and latencies."""
        if job.outcome is not None:
            return
        job.outcome = outcome
        self._count(outcome)
        times = job.token_times
        if times:
            self.prompt_tokens.inc(len(job.prompt_ids))
            self.generated_tokens.inc(len(times))
            self.counts["prompt_tokens"] += len(job.prompt_ids)
            self.counts["generated_tokens"] += len(times)
            self.ttft.observe(times[0] - job.created)
            for a, b in zip(times, times[1:]):
                self.token_latency.observe(b - a)

    def refused(self, status: int) -> None:
        """A request that never became a job (bad body, no key, queue full)."""
        self._count(outcome_of_status(status))

    def _count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()
        self.counts["requests"][outcome] += 1

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def totals(self) -> dict:
        """The counters as plain numbers, for /cluster (the page computes tokens/s from two polls)."""
        return {"requests": dict(self.counts["requests"]), "prompt_tokens": self.counts["prompt_tokens"],
                "generated_tokens": self.counts["generated_tokens"]}


class _FrontCollector:
    """The figures the front and its engine hold, read when scraped."""

    def __init__(self, front) -> None:
        self.front = front

    def describe(self):
        return []                      # nothing to check at registration: the names are fixed below

    def collect(self):
        health, _ = self.front.health()
        engine = self.front.engine_state() or {}

        def gauge(name: str, doc: str, value) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        yield gauge("up", "1 while an engine serves, 0 while it starts, restarts or has failed",
                    1 if health["status"] == "ok" else 0)
        yield gauge("ranks", "Ranks of the running engine", health["ranks"])
        yield gauge("max_batch", "Requests answered together at most (--max-batch)", health["max_batch"])
        yield gauge("requests_running", "Requests in the batch", health["running"])
        yield gauge("requests_waiting", "Requests queued for a slot or the KV pool's blocks", health["queued"])
        restarts = CounterMetricFamily(f"{PREFIX}_engine_restarts", "Engines launched again after a failure")
        restarts.add_metric([], health["restarts"])
        yield restarts
        if "kv_blocks_total" in engine:
            yield gauge("kv_blocks_used", "KV pool blocks held by requests (rank 0's account)", engine["kv_blocks_used"])
            yield gauge("kv_blocks_total", "KV pool blocks per rank", engine["kv_blocks_total"])
        for key, name, doc in [("rss_bytes", "rank_resident_memory_bytes", "Each rank's resident memory"),
                               ("peak_rss_bytes", "rank_peak_resident_memory_bytes", "Each rank's peak resident memory")]:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["rank"])
            for rank, value in enumerate(engine.get(key, [])):
                family.add_metric([str(rank)], value)
            yield family
