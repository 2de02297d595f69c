#!/usr/bin/env python3
"""Three `weave serve` replicas behind vLLM's router, on loopback, measured per policy.

Workload: a multi-tenant chat service. Each of 16 tenants has a long system prompt of its
own; every request is one tenant's system prompt plus a short user turn, tenants drawn at
random, arrivals Poisson (`weave bench serve --request-rate`). Each replica's KV cache is
sized to hold about a third of the tenants' prompts, so where a tenant's requests land
decides whether its prompt is found in a prefix cache or prefilled again.

Phases (each with fresh replicas and a fresh router, so caches and counters start empty):
  policy PNAME   round_robin, power_of_two, cache_aware: the fleet's prefix-cache hit rate
                 (from each replica's /metrics, vLLM's names), TTFT p50/p99, throughput, how
                 requests spread; during cache_aware, /metrics is scraped at 200 req/s and its
                 latency reported.
  failover       one replica SIGKILLed mid-run, then restarted on its port: what the client
                 saw, and whether the restarted replica takes traffic again. Run twice: with
                 streamed requests (`weave bench serve`) and with non-streamed ones (a plain
                 client here), since a router can retry only a response it has not started
                 to forward.
  drain          one replica SIGTERMed mid-run: it must finish what it runs and exit 0, and
                 no request may be lost.

Only 127.0.0.1; bounded request counts; every process started here is stopped by its PID.

    scale_test.py --weave target/release/weave --router VENV/bin/vllm-router [--quick] [--out DIR]
"""

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

HOST = "127.0.0.1"
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go see "
    "number no way could people my than first water been call who oil its now find long down day did get come "
    "made may part over new sound take only little work know place year live me back give most very after thing "
    "our just name good sentence man think say great where help through much before line right too mean old any "
    "same tell boy follow came want show also around form three small set put end does another well large must "
    "big even such because turn here why ask went men read need land different home us move try kind hand picture"
).split()


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def http_get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def wait_healthy(url, proc, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode} before it was healthy")
        try:
            if http_get(url + "/health", timeout=1.0)[0] == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not healthy after {timeout:.0f} s")


def metrics(url):
    """The samples of a Prometheus text page: {name: sum over labels}, and the raw lines."""
    _, text = http_get(url + "/metrics")
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class Fleet:
    """Replicas and a router, each a child process stopped by its PID."""

    def __init__(self, args, workdir):
        self.args = args
        self.workdir = workdir
        self.replicas = {}  # port -> Popen
        self.router = None
        self.logs = []

    def replica_url(self, port):
        return f"http://{HOST}:{port}"

    def start_replica(self, port, tag):
        a = self.args
        cmd = [
            a.weave, "serve", "--host", HOST, "--port", str(port), "--threads", "1",
            "--served-model-name", "smol", "--metrics-prefix", "vllm",
            "--kv-cache-tokens", str(a.kv_cache_tokens), "--max-num-batched-tokens", "1024",
            "--shutdown-timeout", "60",
        ]
        if a.model:
            cmd += ["--model", a.model]
        path = os.path.join(self.workdir, f"replica-{port}-{tag}.log")
        f = open(path, "w")
        self.logs.append(path)
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.replicas[port] = p
        return p

    def start_router(self, policy, tag, log_level="info"):
        a = self.args
        urls = [self.replica_url(p) for p in sorted(self.replicas)]
        cmd = [
            a.router, "--host", HOST, "--port", str(a.router_port), "--worker-urls", *urls,
            "--policy", policy, "--worker-startup-check-interval", "1",
            "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
            "--health-success-threshold", "1", "--log-level", log_level,
            # The router's own metrics, on a port of this test's (not the default 29000).
            "--prometheus-host", HOST, "--prometheus-port", str(a.router_port + 1000),
        ]
        path = os.path.join(self.workdir, f"router-{tag}.log")
        self.router_log = path
        f = open(path, "w")
        self.logs.append(path)
        self.router = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_healthy(f"http://{HOST}:{a.router_port}", self.router, timeout=60)
        # The router's /health can answer before its workers are registered: wait for a
        # request to go through.
        t0 = time.time()
        while time.time() - t0 < 60:
            try:
                body = json.dumps({"model": "smol", "prompt": "hi", "max_tokens": 1}).encode()
                req = urllib.request.Request(f"http://{HOST}:{a.router_port}/v1/completions", data=body,
                                             headers={"content-type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise RuntimeError("the router passed no request within 60 s")

    def up(self, policy, tag, log_level="info"):
        """Fresh replicas on every port, all healthy, then the router in front of them."""
        for p in self.args.ports:
            self.start_replica(p, tag)
        for p in self.args.ports:
            wait_healthy(self.replica_url(p), self.replicas[p])
        self.start_router(policy, tag, log_level)

    def stop(self):
        procs = ([self.router] if self.router else []) + list(self.replicas.values())
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.replicas.clear()
        self.router = None


def make_dataset(path, tenants, prompt_words, turns, seed):
    """One JSONL line a request: a tenant's long system prompt and a short user turn."""
    rng = random.Random(seed)
    systems = []
    for t in range(tenants):
        body = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
        systems.append(f"You are the assistant of tenant {t}. Follow the tenant's handbook below.\n{body}")
    with open(path, "w") as f:
        for _ in range(turns):
            t = rng.randrange(tenants)
            user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
            msgs = [{"role": "system", "content": systems[t]}, {"role": "user", "content": user}]
            f.write(json.dumps({"messages": msgs, "max_tokens": 8}) + "\n")


def bench(args, dataset, num, rate, seed, result_file):
    """`weave bench serve` through the router; its JSON report."""
    cmd = [
        args.weave, "bench", "serve", "--base-url", f"http://{HOST}:{args.router_port}",
        "--endpoint", "/v1/chat/completions", "--model", "smol", "--dataset", dataset,
        "--num-prompts", str(num), "--request-rate", str(rate), "--seed", str(seed),
        "--json", "--disable-progress", "--timeout", "300", "--result-file", result_file,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if out.returncode != 0 and not out.stdout.strip():
        raise RuntimeError(f"bench serve failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Scraper(threading.Thread):
    """GET /metrics at a fixed rate (a gateway's endpoint picker scrapes every 50 ms per pod);
    records each latency."""

    def __init__(self, url, rate):
        super().__init__(daemon=True)
        self.url, self.period = url, 1.0 / rate
        self.lat, self.errors = [], 0
        self.stop_ev = threading.Event()

    def run(self):
        nxt = time.perf_counter()
        while not self.stop_ev.is_set():
            t0 = time.perf_counter()
            try:
                http_get(self.url + "/metrics", timeout=2.0)
                self.lat.append(time.perf_counter() - t0)
            except (urllib.error.URLError, OSError):
                self.errors += 1
            nxt += self.period
            time.sleep(max(0.0, nxt - time.perf_counter()))


def plain_client(args, dataset, num, rate, seed):
    """Non-streamed chat requests through the router, Poisson arrivals, one thread each;
    the same report fields as `weave bench serve`'s that the failover phase reads."""
    rows = [json.loads(line) for line in open(dataset)]
    rng = random.Random(seed)
    url = f"http://{HOST}:{args.router_port}/v1/chat/completions"
    results = [None] * num

    def one(i):
        row = rows[i % len(rows)]
        body = json.dumps({"model": "smol", "messages": row["messages"], "max_tokens": row["max_tokens"],
                           "temperature": 0.0}).encode()
        req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                v = json.loads(r.read())
                results[i] = None if v.get("choices") else f"no choices in {str(v)[:200]}"
        except urllib.error.HTTPError as e:
            results[i] = f"HTTP {e.code}: {e.read()[:200]!r}"
        except (urllib.error.URLError, OSError) as e:
            results[i] = f"request failed: {e}"

    threads, t0, at = [], time.time(), 0.0
    for i in range(num):
        at += rng.expovariate(rate)
        time.sleep(max(0.0, t0 + at - time.time()))
        th = threading.Thread(target=one, args=(i,))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    errors = [e for e in results if e]
    return {"completed": num - len(errors), "failed": len(errors), "errors": errors}


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def fleet_cache(fleet_ports, fleet):
    hits = queries = 0.0
    served = {}
    for p in fleet_ports:
        m = metrics(fleet.replica_url(p))
        hits += m.get("vllm:prefix_cache_hits_total", 0.0)
        queries += m.get("vllm:prefix_cache_queries_total", 0.0)
        served[p] = int(m.get("vllm:request_success_total", 0.0))
    return hits, queries, served


def run_policy(args, workdir, policy, dataset):
    fleet = Fleet(args, workdir)
    try:
        # At debug level the router says when a worker's render reply was unusable.
        fleet.up(policy, policy, log_level="debug" if policy == "cache_aware" else "info")
        h0, q0, s0 = fleet_cache(args.ports, fleet)
        scraper = None
        if policy == "cache_aware":
            scraper = Scraper(fleet.replica_url(args.ports[0]), args.scrape_rate)
            scraper.start()
        rep = bench(args, dataset, args.num_requests, args.rate, args.seed,
                    os.path.join(workdir, f"bench-{policy}.json"))
        if scraper:
            scraper.stop_ev.set()
            scraper.join()
        h1, q1, s1 = fleet_cache(args.ports, fleet)
        row = {
            "policy": policy,
            "completed": rep["completed"],
            "failed": rep["failed"],
            "hit_rate": (h1 - h0) / max(1.0, q1 - q0),
            "ttft_p50_ms": rep["ttft_ms"]["median"],
            "ttft_p99_ms": rep["ttft_ms"]["p99"],
            "e2el_p50_ms": rep["e2el_ms"]["median"],
            "req_per_s": rep["request_throughput"],
            "out_tok_per_s": rep["output_throughput"],
            "spread": [s1[p] - s0.get(p, 0) for p in args.ports],
            "errors": rep["errors"][:5],
        }
        if policy == "cache_aware":
            # vllm-router logs this when /v1/chat/completions/render gave no usable token_ids
            # (it then routes without the prefix tree): the worker contract is broken.
            with open(fleet.router_log, errors="replace") as f:
                row["render_unusable"] = sum("Prefix input preparation unavailable" in line for line in f)
        if scraper:
            row["metrics_scrapes"] = len(scraper.lat)
            row["metrics_scrape_errors"] = scraper.errors
            row["metrics_p50_ms"] = 1000 * pct(scraper.lat, 50)
            row["metrics_p99_ms"] = 1000 * pct(scraper.lat, 99)
        return row
    finally:
        fleet.stop()


def run_failover(args, workdir, dataset, stream=True):
    """SIGKILL one replica mid-run, restart it on its port, and see what the client saw."""
    tag = "failover" if stream else "failover-nostream"
    fleet = Fleet(args, workdir)
    victim = args.ports[-1]
    try:
        fleet.up(args.failover_policy, tag)
        result = {}
        if stream:
            load = lambda: bench(args, dataset, args.num_failover, args.failover_rate, args.seed + 1,  # noqa: E731
                                 os.path.join(workdir, f"bench-{tag}.json"))
        else:
            load = lambda: plain_client(args, dataset, args.num_failover, args.failover_rate, args.seed + 1)  # noqa: E731
        t = threading.Thread(target=lambda: result.update(load()))
        t.start()
        time.sleep(args.kill_after)
        fleet.replicas[victim].kill()
        fleet.replicas[victim].wait()
        killed_at = time.time()
        log(f"{tag}: SIGKILLed replica {victim}")
        time.sleep(args.restart_after)
        p = fleet.start_replica(victim, f"{tag}-restarted")
        wait_healthy(fleet.replica_url(victim), p)
        log(f"{tag}: replica {victim} back after {time.time() - killed_at:.1f} s")
        t.join()
        # A second wave after the restart: the restarted replica must take its share again.
        served_before = int(metrics(fleet.replica_url(victim)).get("vllm:request_success_total", 0.0))
        after = bench(args, dataset, args.num_after_restart, args.failover_rate, args.seed + 2,
                      os.path.join(workdir, f"bench-{tag}-after-restart.json"))
        served_by_restarted = int(metrics(fleet.replica_url(victim)).get("vllm:request_success_total", 0.0))
        return {
            "policy": args.failover_policy,
            "stream": stream,
            "served_after_restart_wave": served_by_restarted - served_before,
            "during": {k: result.get(k) for k in ("completed", "failed")},
            "during_errors": result.get("errors", [])[:5],
            "after": {k: after.get(k) for k in ("completed", "failed")},
            "served_by_restarted": served_by_restarted,
        }
    finally:
        fleet.stop()


def run_drain(args, workdir, dataset):
    """SIGTERM one replica mid-run: it drains and exits 0; nothing is lost."""
    fleet = Fleet(args, workdir)
    victim = args.ports[1]
    try:
        fleet.up(args.failover_policy, "drain")
        result = {}
        t = threading.Thread(target=lambda: result.update(
            bench(args, dataset, args.num_failover, args.failover_rate, args.seed + 3,
                  os.path.join(workdir, "bench-drain.json"))))
        t.start()
        time.sleep(args.kill_after)
        before = metrics(fleet.replica_url(victim))
        running = int(before.get("vllm:num_requests_running", 0) + before.get("vllm:num_requests_waiting", 0))
        fleet.replicas[victim].send_signal(signal.SIGTERM)
        code = fleet.replicas[victim].wait(timeout=90)
        log(f"drain: replica {victim} exited {code} (it had {running} request(s) in flight)")
        t.join()
        return {
            "policy": args.failover_policy,
            "in_flight_at_sigterm": running,
            "exit_code": code,
            "completed": result.get("completed"),
            "failed": result.get("failed"),
            "errors": result.get("errors", [])[:5],
        }
    finally:
        fleet.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weave", required=True)
    ap.add_argument("--router", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="target/scale")
    ap.add_argument("--quick", action="store_true", help="fewer requests (CI)")
    ap.add_argument("--phases", default="round_robin,power_of_two,cache_aware,failover,failover_nostream,drain")
    ap.add_argument("--tenants", type=int, default=16)
    ap.add_argument("--prompt-words", type=int, default=300)
    ap.add_argument("--kv-cache-tokens", type=int, default=2048, help="per replica")
    ap.add_argument("--num-requests", type=int, default=120)
    ap.add_argument("--rate", type=float, default=1.0, help="requests/s in the policy phases")
    ap.add_argument("--failover-rate", type=float, default=2.0, help="requests/s in failover and drain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scrape-rate", type=float, default=200.0)
    ap.add_argument("--failover-policy", default="round_robin")
    ap.add_argument("--num-failover", type=int, default=60)
    ap.add_argument("--num-after-restart", type=int, default=24)
    ap.add_argument("--kill-after", type=float, default=5.0)
    ap.add_argument("--restart-after", type=float, default=2.0)
    ap.add_argument("--ports", default="18201,18202,18203")
    ap.add_argument("--router-port", type=int, default=18200)
    args = ap.parse_args()
    args.ports = [int(p) for p in args.ports.split(",")]
    if args.quick:
        args.tenants, args.num_requests, args.rate, args.num_failover, args.num_after_restart = 8, 40, 2.0, 24, 12
    os.makedirs(args.out, exist_ok=True)
    dataset = os.path.join(args.out, "multitenant.jsonl")
    make_dataset(dataset, args.tenants, args.prompt_words, 2000, args.seed)

    results = {"config": {k: v for k, v in vars(args).items()}, "policies": [], "failover": [], "drain": None}
    ok = True
    for ph in args.phases.split(","):
        t0 = time.time()
        if ph in ("round_robin", "power_of_two", "cache_aware", "random"):
            row = run_policy(args, args.out, ph, dataset)
            results["policies"].append(row)
            ok &= row["failed"] == 0 and row.get("render_unusable", 0) == 0
        elif ph in ("failover", "failover_nostream"):
            f = run_failover(args, args.out, dataset, stream=ph == "failover")
            results["failover"].append(f)
            # Streams cut by the SIGKILL cannot be retried; everything after must pass, and
            # the restarted replica must take traffic again.
            ok &= f["after"]["failed"] == 0 and f["served_after_restart_wave"] > 0
            if not f["stream"]:
                ok &= f["during"]["failed"] == 0
        elif ph == "drain":
            results["drain"] = run_drain(args, args.out, dataset)
            ok &= results["drain"]["exit_code"] == 0 and results["drain"]["failed"] == 0
        else:
            sys.exit(f"unknown phase {ph}")
        log(f"{ph}: {time.time() - t0:.0f} s")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)

    # The table, as docs/SCALING.md shows it.
    if results["policies"]:
        print("| policy | completed | failed | prefix-cache hit rate | TTFT p50 (ms) | TTFT p99 (ms) | req/s | output tok/s | requests per replica |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in results["policies"]:
            print(f"| {r['policy']} | {r['completed']} | {r['failed']} | {100 * r['hit_rate']:.1f}% | "
                  f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['req_per_s']:.2f} | "
                  f"{r['out_tok_per_s']:.1f} | {' / '.join(map(str, r['spread']))} |")
        by = {r["policy"]: r for r in results["policies"]}
        if "cache_aware" in by and "round_robin" in by:
            ca, rr = by["cache_aware"], by["round_robin"]
            ratio = ca["hit_rate"] / max(1e-9, rr["hit_rate"])
            print(f"\ncache_aware / round_robin: hit rate {ratio:.2f}x, TTFT p50 "
                  f"{ca['ttft_p50_ms']:.0f} vs {rr['ttft_p50_ms']:.0f} ms")
            results["cache_aware_vs_round_robin"] = {"hit_rate_ratio": ratio}
            if not args.quick:  # the target; a quick run has too few turns per tenant
                ok &= ratio >= 2.0 and ca["ttft_p50_ms"] < rr["ttft_p50_ms"]
        if "cache_aware" in by:
            ca = by["cache_aware"]
            print(f"render replies the router could not use: {ca['render_unusable']}")
            if "metrics_p99_ms" in ca:
                print(f"/metrics under load ({ca['metrics_scrapes']} scrapes at {args.scrape_rate:.0f}/s, "
                      f"{ca['metrics_scrape_errors']} errors): p50 {ca['metrics_p50_ms']:.2f} ms, "
                      f"p99 {ca['metrics_p99_ms']:.2f} ms")
    for f in results["failover"]:
        kind = "streamed" if f["stream"] else "non-streamed"
        print(f"\nfailover ({f['policy']}, {kind}): during the SIGKILL {f['during']['completed']} completed, "
              f"{f['during']['failed']} failed; after the restart {f['after']['completed']} completed, "
              f"{f['after']['failed']} failed, {f['served_after_restart_wave']} of them on the restarted replica")
        for e in f["during_errors"]:
            print(f"  error seen by the client: {e}")
    if results["drain"]:
        d = results["drain"]
        print(f"\ndrain ({d['policy']}): SIGTERM with {d['in_flight_at_sigterm']} in flight, exit code "
              f"{d['exit_code']}; {d['completed']} completed, {d['failed']} failed")
        for e in d["errors"]:
            print(f"  error seen by the client: {e}")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\nscale test:", "passed" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
