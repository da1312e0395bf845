#!/usr/bin/env python3
"""Two builds of xfer side by side: the same upload and download, interleaved round by round.

    bench/ab.py OLD_BIN_DIR NEW_BIN_DIR [--mib 512] [--rounds 5] [--workdir /var/tmp]

Each BIN_DIR holds a release `xferd` and `xfer` (for example `target/release` of two checkouts).
Both daemons run at once, each on its own storage in WORKDIR (the VM disk: fsync kept), and every
round moves the same file through A then B, or B then A (the order alternates), with `sync` and a
drop of the page cache before every command. It prints medians of wall time and of CPU per byte
for client + daemon (the client's rusage from wait4, the daemon's utime + stime from
/proc/PID/stat), and B's ratio to A's per round. bench/compare.py compares xfer with OpenSSH;
this compares a change with what it changed. `--sides` adds the client's and the daemon's CPU
apart: a change to one side (the sender, say) shows there, out of the other side's noise.
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

CLK = os.sysconf("SC_CLK_TCK")


def daemon_cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def drop_caches():
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        pass


class Build:
    """A daemon of the build in BINDIR with user `bench` logged in. `edit(config_path)` runs
    after `xferd init` (bench/object.py points the storage at a bucket there); `daemon_env`
    is added to the environment of every `xferd` command (the store's credentials)."""

    def __init__(self, name, bindir, work, edit=None, daemon_env=None):
        self.name = name
        self.xferd = os.path.join(bindir, "xferd")
        self.xfer = os.path.join(bindir, "xfer")
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "etc", "xferd.toml")
        self.env = dict(os.environ, XFER_CONFIG_DIR=os.path.join(self.dir, "client"))
        denv = dict(os.environ, **(daemon_env or {}))
        subprocess.run([self.xferd, "--config", self.config, "init", "--listen", "127.0.0.1:0"],
                       check=True, stdout=subprocess.DEVNULL)
        if edit:
            edit(self.config)
        subprocess.run([self.xferd, "--config", self.config, "user", "add", "bench",
                        "--password-stdin"], input=b"bench-pw\n", check=True,
                       stdout=subprocess.DEVNULL, env=denv)
        self.log = open(os.path.join(self.dir, "daemon.log"), "w+")
        self.daemon = subprocess.Popen([self.xferd, "--config", self.config, "serve"],
                                       stderr=self.log, env=dict(denv, XFERD_LOG="info"))
        addr = None
        for _ in range(200):
            self.log.seek(0)
            m = re.search(r"listen=(\S+)", self.log.read())
            if m:
                addr = m.group(1)
                break
            time.sleep(0.05)
        if not addr:
            sys.exit(f"{name}: the daemon did not start; see {self.log.name}")
        fp = subprocess.run([self.xferd, "--config", self.config, "fingerprint"], check=True,
                            capture_output=True, text=True).stdout.strip()
        subprocess.run([self.xfer, "-q", "login", f"bench@{addr}", "--fingerprint", fp,
                        "--password-stdin"], input=b"bench-pw\n", check=True, env=self.env)
        self.down = os.path.join(self.dir, "down")
        os.makedirs(self.down)

    def timed(self, args):
        """Wall seconds, and CPU seconds of the client and of the daemon, of one `xfer` command."""
        drop_caches()
        d0 = daemon_cpu(self.daemon.pid)
        t0 = time.perf_counter()
        child = subprocess.Popen([self.xfer, "-q", *args], env=self.env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        if status != 0:
            sys.exit(f"{self.name}: xfer {' '.join(args)} failed ({status})")
        return wall, usage.ru_utime + usage.ru_stime, daemon_cpu(self.daemon.pid) - d0

    def stop(self):
        self.daemon.terminate()
        self.daemon.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--tiny", action="store_true",
                    help="also download a 1-byte file: the cold start of a command (binaries "
                         "and state read from disk after the cache drop)")
    ap.add_argument("--sides", action="store_true",
                    help="also print the client's and the daemon's CPU per byte apart")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="xfer-ab.", dir=a.workdir)
    builds = []
    try:
        builds = [Build("A", a.old, work), Build("B", a.new, work)]
        payload = os.path.join(work, "payload")
        with open(payload, "wb") as f:
            for _ in range(a.mib):
                f.write(os.urandom(1 << 20))
        size = a.mib << 20
        tiny = os.path.join(work, "tiny")
        with open(tiny, "wb") as f:
            f.write(b"x")
        if a.tiny:
            for b in builds:
                b.timed(["upload", tiny])
        tiny_ms = {"A": [], "B": []}
        # results[case][build] = [(wall, client cpu, daemon cpu), ...]
        results = {"upload": {"A": [], "B": []}, "download": {"A": [], "B": []}}
        for r in range(a.rounds):
            order = builds if r % 2 == 0 else builds[::-1]
            for b in order:
                results["upload"][b.name].append(b.timed(["upload", payload]))
            for b in order:
                target = os.path.join(b.down, "payload")
                if os.path.exists(target):
                    os.remove(target)
                results["download"][b.name].append(b.timed(["download", "payload", "--to", b.down]))
                if subprocess.run(["cmp", "-s", payload, target]).returncode != 0:
                    sys.exit(f"{b.name}: the downloaded copy differs")
            for b in order if a.tiny else []:
                target = os.path.join(b.down, "tiny")
                if os.path.exists(target):
                    os.remove(target)
                tiny_ms[b.name].append(b.timed(["download", "tiny", "--to", b.down])[0] * 1e3)
        print(f"{a.mib} MiB, {a.rounds} rounds interleaved, sync + drop_caches before each command;"
              f" load average {os.getloadavg()[0]:.2f}")
        print(f"A = {a.old}\nB = {a.new}")
        print(f"{'case':<9} {'A MiB/s':>8} {'B MiB/s':>8} {'B/A time':>9}"
              f" {'A ns/B':>7} {'B ns/B':>7} {'B/A cpu':>8}")
        for case, per in results.items():
            mibs = {k: statistics.median(size / r[0] / 2**20 for r in v) for k, v in per.items()}
            nsb = {k: statistics.median((c + d) / size * 1e9 for _, c, d in v)
                   for k, v in per.items()}
            time_ratio = statistics.median(b[0] / a_[0] for a_, b in zip(per["A"], per["B"]))
            cpu_ratio = statistics.median((b[1] + b[2]) / (a_[1] + a_[2])
                                          for a_, b in zip(per["A"], per["B"]))
            print(f"{case:<9} {mibs['A']:>8.0f} {mibs['B']:>8.0f} {time_ratio:>9.3f}"
                  f" {nsb['A']:>7.2f} {nsb['B']:>7.2f} {cpu_ratio:>8.3f}")
        if a.tiny:
            ratio = statistics.median(y / x for x, y in zip(tiny_ms["A"], tiny_ms["B"]))
            print(f"1-byte download, cold: A {statistics.median(tiny_ms['A']):.1f} ms,"
                  f" B {statistics.median(tiny_ms['B']):.1f} ms, B/A {ratio:.3f}")
        if a.sides:
            print(f"{'case':<9} {'side':<7} {'A ns/B':>7} {'B ns/B':>7} {'B/A cpu':>8}")
            for case, per in results.items():
                for i, side in ((1, "client"), (2, "daemon")):
                    nsb = {k: statistics.median(r[i] / size * 1e9 for r in v)
                           for k, v in per.items()}
                    ratio = statistics.median(b[i] / max(a_[i], 1e-9)
                                              for a_, b in zip(per["A"], per["B"]))
                    print(f"{case:<9} {side:<7} {nsb['A']:>7.2f} {nsb['B']:>7.2f} {ratio:>8.3f}")
    finally:
        for b in builds:
            b.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
