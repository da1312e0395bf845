#!/usr/bin/env python3
"""Upload and download MB/s through the object backend next to the local one, on one machine.

    bench/object.py [BIN_DIR] [--sizes 256,1024] [--rounds 5] [--workdir /var/tmp]
    flock /tmp/xfer-bench.lock bench/object.py target/release        # as the figures were taken

BIN_DIR (default target/release) holds a release `xferd` and `xfer`. The script starts the
3-node Garage cluster of the tests (tests/cluster/garage.sh start, replication factor 3, in
WORKDIR on the VM disk), then two daemons of that build: one with `[storage] kind = "local"`
(root in WORKDIR: fsync kept) and one with `kind = "s3"` on the cluster's bucket (node 1's
endpoint, default part size and parts in flight). For each size, round after round, it uploads
one file through each daemon, then downloads it through each (the order alternates per round),
with `sync` and a page-cache drop before every command, and checks each downloaded copy byte for
byte. Each round's file is new data (a stamp at every MiB): Garage stores content-addressed
1 MiB blocks, so uploading the same bytes again would skip its disk writes.

Printed per size and backend: median MB/s (10^6 bytes/s) of wall time, the median CPU of xferd +
client per byte (ns/B), and Garage's CPU per byte apart (its three nodes, summed, counted until
they go idle after the command: the third replica is written after the upload has returned).
Garage runs on the same two cores as everything else, so its CPU is part of the object path's
cost here; on a real deployment it runs elsewhere.

With --perf SECS, `perf record -g` samples the s3 daemon for SECS seconds during one extra
upload of the largest size and prints the top of `perf report`.

Nothing here runs in `cargo test` or CI: figures on a shared machine are not pass/fail tests.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab import Build, CLK, daemon_cpu, drop_caches  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GARAGE_SH = os.path.join(REPO, "tests", "cluster", "garage.sh")
MIB = 1 << 20


def read_env(path):
    env = {}
    for line in open(path):
        if "=" in line:
            k, v = line.strip().split("=", 1)
            env[k] = v
    return env


def set_storage(config, values):
    """Replaces `key = value` lines of the [storage] section of `config`."""
    out, section = [], None
    for line in open(config).read().splitlines():
        m = re.match(r"\[(\w+)\]", line)
        if m:
            section = m.group(1)
        key = line.split("=", 1)[0].strip() if "=" in line and not line.startswith("#") else None
        if section == "storage" and key in values:
            line = f"{key} = {values.pop(key)}"
        out.append(line)
    if values:
        sys.exit(f"no [storage] keys {sorted(values)} in {config}")
    open(config, "w").write("\n".join(out) + "\n")


class Garage:
    def __init__(self, work):
        self.dir = os.path.join(work, "garage")
        subprocess.run(["bash", GARAGE_SH, "start", self.dir], check=True)
        self.env = read_env(os.path.join(self.dir, "s3.env"))
        self.pids = [int(self.env[f"XFER_GARAGE_{n}_PID"]) for n in (1, 2, 3)]

    def cpu(self):
        return sum(daemon_cpu(p) for p in self.pids)

    def settled_cpu(self, limit=30.0):
        """Garage's CPU seconds once it has gone idle (two readings 0.3 s apart within a tick),
        so that replica writes finishing after the reply are counted."""
        last = self.cpu()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.cpu()
            if now - last <= 1.0 / CLK:
                return now
            last = now
        return last

    def stop(self):
        subprocess.run(["bash", GARAGE_SH, "stop", self.dir], check=False)


def stamp(path, round_no):
    """Makes `path` new data for Garage: 16 bytes at the start of every MiB."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for off in range(0, size, MIB):
            f.seek(off)
            f.write(f"round{round_no:05d}@{off:016x}".encode()[:16])


def measure(build, garage, args):
    """(wall s, xferd + client CPU s, Garage CPU s) of one `xfer` command."""
    g0 = garage.settled_cpu()
    wall, client, daemon = build.timed(args)
    return wall, client + daemon, garage.settled_cpu() - g0


def perf_profile(build, payload, secs, work):
    data = os.path.join(work, "perf.data")
    drop_caches()
    rec = subprocess.Popen(["perf", "record", "-g", "-o", data, "-p", str(build.daemon.pid),
                            "--", "sleep", str(secs)], stderr=subprocess.DEVNULL)
    child = subprocess.Popen([build.xfer, "-q", "upload", payload], env=build.env)
    child.wait()
    rec.wait()
    rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--percent-limit", "1.5",
                          "--stdio", "-g", "none", "--sort", "dso,symbol"],
                         capture_output=True, text=True)
    print(f"\nperf record -g -p <s3 xferd> for {secs} s during an upload of "
          f"{os.path.getsize(payload) // MIB} MiB (self time, >= 1.5%):")
    print("\n".join(line for line in rep.stdout.splitlines()
                    if line.strip() and not line.startswith("#")))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bindir", nargs="?", default=os.path.join(REPO, "target", "release"))
    ap.add_argument("--sizes", default="256,1024", help="file sizes in MiB, comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--perf", type=int, default=0, metavar="SECS",
                    help="perf-record the s3 daemon for SECS during one extra upload")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    # Every round's upload is new data on three replicas, kept until Garage's block GC runs
    # (10 minutes after the overwrite): make sure the disk holds it.
    need = (3 * a.rounds + 2) * sum(sizes) * MIB + 2 * max(sizes) * MIB
    free = shutil.disk_usage(a.workdir).free
    if free < need + (4 << 30):
        sys.exit(f"{a.workdir} has {free >> 30} GiB free; this run needs about {need >> 30} GiB"
                 " (fewer --rounds or smaller --sizes)")
    work = tempfile.mkdtemp(prefix="xfer-object.", dir=a.workdir)
    garage, builds = None, []
    try:
        garage = Garage(work)
        env = garage.env
        creds = {"AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
                 "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"]}

        def on_bucket(config):
            set_storage(config, {
                "kind": '"s3"',
                "bucket": f'"{env["XFER_S3_BUCKET"]}"',
                "endpoint": f'"{env["XFER_S3_ENDPOINT"]}"',
                "region": f'"{env["XFER_S3_REGION"]}"',
                "allow_http": "true",
                "prefix": f'"bench-{os.getpid()}"',
            })

        local = Build("local", a.bindir, work)
        builds.append(local)
        # The bucket may take a moment to answer after the cluster starts; `xferd user add`
        # (which writes the users object) is the first request.
        for attempt in range(20):
            try:
                s3 = Build(f"s3-{attempt}", a.bindir, work, edit=on_bucket, daemon_env=creds)
                break
            except subprocess.CalledProcessError:
                time.sleep(0.5)
        else:
            sys.exit("the s3 daemon never started; see its folder under " + work)
        s3.name = "s3"
        builds.append(s3)

        # results[size][backend][case] = [(wall, cpu, garage cpu), ...]
        results = {}
        for mib in sizes:
            payload = os.path.join(work, f"payload-{mib}")
            with open(payload, "wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(MIB))
            per = {b.name: {"upload": [], "download": []} for b in builds}
            for r in range(a.rounds):
                stamp(payload, r)
                order = builds if r % 2 == 0 else builds[::-1]
                for b in order:
                    per[b.name]["upload"].append(measure(b, garage, ["upload", payload]))
                for b in order:
                    target = os.path.join(b.down, os.path.basename(payload))
                    if os.path.exists(target):
                        os.remove(target)
                    per[b.name]["download"].append(
                        measure(b, garage, ["download", os.path.basename(payload),
                                            "--to", b.down]))
                    if subprocess.run(["cmp", "-s", payload, target]).returncode != 0:
                        sys.exit(f"{b.name}: the downloaded copy of {mib} MiB differs")
                    os.remove(target)
                print(f"{mib} MiB round {r + 1}/{a.rounds} done", file=sys.stderr)
            results[mib] = per

        print(f"\n{a.rounds} rounds interleaved per size, sync + drop_caches before each"
              f" command; medians; load average {os.getloadavg()[0]:.2f} at the end")
        print(f"{'size':>8} {'backend':<7} {'case':<9} {'MB/s':>6} {'s3/local':>8}"
              f" {'xferd+xfer ns/B':>15} {'Garage ns/B':>11}")
        for mib, per in results.items():
            size = mib * MIB
            for case in ("upload", "download"):
                mbs = {k: statistics.median(size / w / 1e6 for w, _, _ in v[case])
                       for k, v in per.items()}
                for name in ("local", "s3"):
                    rows = per[name][case]
                    cpu = statistics.median(c / size * 1e9 for _, c, _ in rows)
                    gar = statistics.median(g / size * 1e9 for _, _, g in rows)
                    ratio = f"{mbs['s3'] / mbs['local']:.2f}x" if name == "s3" else ""
                    print(f"{mib:>4} MiB {name:<7} {case:<9} {mbs[name]:>6.0f} {ratio:>8}"
                          f" {cpu:>15.2f} {gar:>11.2f}")
        if a.perf:
            perf_profile(s3, os.path.join(work, f"payload-{max(sizes)}"), a.perf, work)
    finally:
        for b in builds:
            b.stop()
        if garage:
            garage.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
