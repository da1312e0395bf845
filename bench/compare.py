#!/usr/bin/env python3
"""Side-by-side benchmark of xfer against OpenSSH: the ruler for issue 10's targets.

    bench/compare.py                 # full sizes, 5 rounds (about 10-15 minutes here)
    bench/compare.py --quick         # small sizes, 2 rounds: a smoke check of about a minute
    bench/compare.py --only big,list --rounds 3 --profile

Must run as root (cgroups, drop_caches, sshd with its own config). It:
  * builds release binaries (cargo build --release), installs openssh-server and gnuplot with
    apt-get when missing;
  * starts, in a temp folder on the VM disk (default /var/tmp, never tmpfs): an xferd with its
    default limits (fsync kept) and an sshd on a free loopback port with its own host key,
    key-only login of a local user `xferbench` (shell /bin/sh; created for the run and removed
    after it) and Debian's sftp-server; clients use -c aes128-gcm@openssh.com;
  * runs each target interleaved with its peer, round after round (which tool goes first
    alternates), with `sync` and a page-cache drop before every measured command;
  * measures wall time and CPU of both ends: the client's CPU is the rusage wait4 returns for
    each client process (it includes what that process waited for: scp's ssh, both sides of a
    `tar | ssh` pipeline); the server's is a cgroup v1 cpuacct delta (v2 cpu.stat as a
    fallback): one cgroup for xferd, one for sshd and every per-connection process it forks
    (sshd, sftp-server, the user's /bin/sh, tar);
  * checks every transferred copy byte for byte (outside the timed part);
  * peak RSS of a freshly started daemon per case (VmHWM, reset after start-up);
  * prints one table (medians; ratios are medians of per-round paired ratios), writes
    results.json, table.md, details.md and a PNG chart (gnuplot) to --out;
  * with --profile, perf-records the daemon (DWARF call chains) through big uploads.

The method, the machine and the figures are in docs/PERFORMANCE.md.

Nothing here runs in `cargo test` or CI: figures on a shared machine are not pass/fail tests.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
CIPHER = "aes128-gcm@openssh.com"
XFER_PW = "bench-pw-not-secret"
SSH_USER = "xferbench"  # the local account the OpenSSH peers log in as (key only)

# ----------------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    """Runs a setup command (not measured); fails loudly with its output."""
    kw.setdefault("check", True)
    kw.setdefault("text", True)
    kw.setdefault("capture_output", True)
    try:
        return subprocess.run(cmd, **kw)
    except subprocess.CalledProcessError as e:
        sys.exit(f"compare.py: `{' '.join(map(str, cmd))}` failed ({e.returncode}):\n{e.stdout}{e.stderr}")


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MIB)
            f.write(os.urandom(n))
            left -= n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def fs_type(path: Path) -> str:
    """The filesystem and device under path, e.g. `ext4 on /dev/vda`."""
    r = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", str(path)],
                       capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.split():
        fstype, source = r.stdout.split()[:2]
        return f"{fstype} on {source}"
    return run(["stat", "-f", "-c", "%T", str(path)]).stdout.strip()


def tree_equal(a: Path, b: Path) -> bool:
    """True when both trees hold the same folders and files with the same bytes."""
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(tree_equal(a / d, b / d) for d in cmp.common_dirs)


def same_file(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ----------------------------------------------------------------------------------------------
# CPU accounting: one cgroup per side


class Cgroup:
    """A cpuacct cgroup (v1, else v2): its CPU time in ns, and a way for a child to join it."""

    def __init__(self, name: str):
        v1 = Path("/sys/fs/cgroup/cpuacct")
        v2 = Path("/sys/fs/cgroup/unified")
        if not v2.is_dir() and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            v2 = Path("/sys/fs/cgroup")
        if (v1 / "cpuacct.usage").exists():
            self.kind, self.path = "cgroup v1 cpuacct", v1 / name
        elif v2.is_dir():
            self.kind, self.path = "cgroup v2 cpu.stat", v2 / name
        else:
            sys.exit("compare.py: no cpuacct (v1) or cgroup v2 hierarchy to account CPU with")
        self.path.mkdir(exist_ok=True)
        self.procs_file = str(self.path / "cgroup.procs")

    def usage_ns(self) -> int:
        if self.kind.startswith("cgroup v1"):
            return int((self.path / "cpuacct.usage").read_text())
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, value = line.split()
            if key == "usage_usec":
                return int(value) * 1000
        raise RuntimeError("cpu.stat without usage_usec")

    def pids(self) -> set[int]:
        return {int(p) for p in Path(self.procs_file).read_text().split()}

    def enter(self) -> None:
        """preexec_fn: moves the freshly forked child (and so all it starts) into this group."""
        with open(self.procs_file, "w") as f:
            f.write("0")

    def remove(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)


class MachineMeter:
    """How busy the machine was with work other than this run: busy CPU from /proc/stat minus
    what this run used (itself, every child it reaped, both servers' cgroups). Kernel threads
    that write back our files count as "other", so this overstates the others a little."""

    def __init__(self, servers: list[Cgroup]):
        self.servers = servers
        self.tick = os.sysconf("SC_CLK_TCK")
        self.start = self.last = self.sample()

    def sample(self) -> dict:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        user, nice, system, idle, iowait, irq, softirq, steal = f
        own = sum(getattr(resource.getrusage(w), k) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for k in ("ru_utime", "ru_stime"))
        own += sum(cg.usage_ns() for cg in self.servers) / 1e9
        return {"t": time.monotonic(), "busy": (user + nice + system + irq + softirq) / self.tick,
                "steal": steal / self.tick, "own": own}

    def since(self, a: dict) -> dict:
        b = self.sample()
        cores = os.cpu_count() or 1
        span = (b["t"] - a["t"]) * cores
        return {"others_pct": 100 * max(0.0, (b["busy"] - a["busy"]) - (b["own"] - a["own"])) / span,
                "own_pct": 100 * (b["own"] - a["own"]) / span,
                "steal_pct": 100 * (b["steal"] - a["steal"]) / span,
                "loadavg": os.getloadavg()[0]}

    def round(self) -> dict:
        r = self.since(self.last)
        self.last = self.sample()
        return r


# ----------------------------------------------------------------------------------------------
# the bench environment: both servers, both clients, the data


class Bench:
    def __init__(self, args):
        self.args = args
        self.procs: list[subprocess.Popen] = []
        self.created_user = False
        self.cgroups: list[Cgroup] = []
        parent = Path(args.workdir)
        self.work = Path(tempfile.mkdtemp(prefix="xfer-bench-", dir=parent))
        self.fs = fs_type(self.work)
        if self.fs.split()[0] in ("tmpfs", "ramfs") and not args.allow_tmpfs:
            sys.exit(f"compare.py: {parent} is {self.fs}; the targets are about the VM disk (--workdir)")
        tag = f"xfer-bench-{os.getpid()}"
        self.cg_xferd = self._cgroup(f"{tag}-xferd")
        self.cg_sshd = self._cgroup(f"{tag}-sshd")
        self.local = self.work / "local"  # the client machine's files
        self.down = self.work / "down"  # where downloads land
        for d in (self.local, self.down):
            d.mkdir()
        self.drop_method = self._drop_method(args.drop)

    def _cgroup(self, name: str) -> Cgroup:
        cg = Cgroup(name)
        self.cgroups.append(cg)
        return cg

    # -- page cache --------------------------------------------------------------------------

    def _drop_method(self, wanted: str) -> str:
        if wanted in ("auto", "global"):
            try:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("1")
                return "sync + echo 1 > /proc/sys/vm/drop_caches (whole page cache), binaries re-read"
            except OSError as e:
                if wanted == "global":
                    sys.exit(f"compare.py: cannot write /proc/sys/vm/drop_caches: {e}")
                wanted = "files"
        if wanted == "files":
            return "sync + posix_fadvise(DONTNEED) on every file of the bench folder"
        return "sync only"

    def settle(self) -> None:
        """Before every measured command: nothing dirty, the test files' pages gone."""
        os.sync()
        if self.drop_method.startswith("sync + echo"):
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1")
            self._warm_binaries()
        elif self.drop_method.startswith("sync + posix"):
            for dirpath, _, files in os.walk(self.work):
                for name in files:
                    try:
                        fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
                    except OSError:
                        continue
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)

    def _warm_binaries(self) -> None:
        # Both tools' programs and libraries come back into the cache so that the first exec after
        # a global drop does not charge a disk read to whichever tool happens to run first.
        if not hasattr(self, "_warm_list"):
            progs = [self.xfer, Path("/usr/bin/ssh"), Path("/usr/bin/scp"), Path("/usr/bin/sftp"),
                     Path("/usr/sbin/sshd"), Path("/usr/lib/openssh/sftp-server"),
                     Path(shutil.which("tar") or "/bin/tar"), Path("/bin/bash"), Path("/bin/sh")]
            libs: set[str] = set()
            for p in progs:
                out = subprocess.run(["ldd", str(p)], capture_output=True, text=True).stdout
                libs.update(tok for tok in out.split() if tok.startswith("/"))
            self._warm_list = [str(p) for p in progs] + sorted(libs)
            self._warm_list += [str(self.ssh_dir / n) for n in ("ssh_config", "id_ed25519", "known_hosts")]
        for p in self._warm_list:
            try:
                with open(p, "rb") as f:
                    while f.read(1 << 20):
                        pass
            except OSError:
                pass

    # -- servers ------------------------------------------------------------------------------

    def build(self) -> None:
        if not self.args.no_build:
            log("cargo build --release --bin xferd --bin xfer")
            subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "xferd", "--bin", "xfer"],
                           cwd=REPO, check=True)
        self.xferd = REPO / "target/release/xferd"
        self.xfer = REPO / "target/release/xfer"
        for b in (self.xferd, self.xfer):
            if not b.exists():
                sys.exit(f"compare.py: {b} missing (drop --no-build)")

    def start_xferd(self) -> None:
        etc = self.work / "xferd"
        self.xferd_conf = etc / "xferd.toml"
        # A fixed port, so that a restarted daemon (fresh RSS) is the same server to the client.
        addr = f"127.0.0.1:{free_port()}"
        run([self.xferd, "--config", self.xferd_conf, "init", "--listen", addr])
        run([self.xferd, "--config", self.xferd_conf, "user", "add", "bench", "--password-stdin"],
            input=XFER_PW + "\n")
        self.xferd_log = etc / "daemon.log"
        self._spawn_xferd()
        fp = run([self.xferd, "--config", self.xferd_conf, "fingerprint"]).stdout.strip()
        self.xfer_env = dict(os.environ, XFER_CONFIG_DIR=str(self.work / "xfer-client"))
        run([self.xfer, "-q", "login", f"bench@{addr}", "--fingerprint", fp, "--password-stdin"],
            input=XFER_PW + "\n", env=self.xfer_env)
        self.store = etc / "storage" / "bench"  # the user's tree as the daemon writes it
        if not self.store.is_dir():
            sys.exit(f"compare.py: expected the user's storage at {self.store}")
        log(f"xferd pid {self.xferd_pid} on {addr}, storage {self.store} ({self.fs})")

    def _spawn_xferd(self) -> None:
        env = dict(os.environ, XFERD_LOG="warn,xferd::server=info")
        with open(self.xferd_log, "a") as err:
            start = err.tell()
            p = subprocess.Popen([self.xferd, "--config", self.xferd_conf, "serve"], stdout=subprocess.DEVNULL,
                                 stderr=err, env=env, preexec_fn=self.cg_xferd.enter)
        self.procs.append(p)
        self.xferd_proc, self.xferd_pid = p, p.pid
        for _ in range(200):
            with open(self.xferd_log) as f:
                f.seek(start)
                text = f.read()
            if "listen=" in text:
                return
            if p.poll() is not None:
                sys.exit(f"compare.py: xferd exited:\n{text}")
            time.sleep(0.05)
        sys.exit("compare.py: xferd did not report its address")

    def restart_xferd(self) -> None:
        """A fresh daemon (SIGTERM, the documented clean stop; sessions survive restarts), so a
        peak RSS is this case's own and not what the allocator kept from earlier cases."""
        self.xferd_proc.terminate()
        if self.xferd_proc.wait(timeout=30) != 0:
            sys.exit(f"compare.py: xferd exited {self.xferd_proc.returncode} on SIGTERM")
        self._spawn_xferd()

    def start_sshd(self) -> None:
        if not Path("/usr/sbin/sshd").exists() or not shutil.which("gnuplot"):
            pkgs = [p for p, ok in (("openssh-server", Path("/usr/sbin/sshd").exists()),
                                    ("gnuplot-nox", shutil.which("gnuplot"))) if not ok]
            log(f"apt-get install {' '.join(pkgs)}")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            run(["apt-get", "update", "-qq"], env=env)
            run(["apt-get", "install", "-y", "-qq", *pkgs], env=env)
        d = self.ssh_dir = self.work / "ssh"
        d.mkdir()
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "host_ed25519"])
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "id_ed25519"])
        shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
        self.sshroot = self.work / "sshroot"  # what the OpenSSH peers write to and read from
        self.sshroot.mkdir()
        self._ssh_user()
        port = free_port()
        sftp_server = "/usr/lib/openssh/sftp-server"
        (d / "sshd_config").write_text(f"""\
# Written by bench/compare.py: key-only login of one local user on loopback, nothing else.
Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_ed25519'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
PermitRootLogin no
AllowUsers {SSH_USER}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
MaxStartups 100:30:200
MaxSessions 64
LogLevel ERROR
Subsystem sftp {sftp_server}
""")
        host_pub = (d / "host_ed25519.pub").read_text().split()
        (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
        (d / "ssh_config").write_text(f"""\
Host bench
  HostName 127.0.0.1
  Port {port}
  User {SSH_USER}
  IdentityFile {d / 'id_ed25519'}
  IdentitiesOnly yes
  UserKnownHostsFile {d / 'known_hosts'}
  StrictHostKeyChecking yes
  BatchMode yes
  Ciphers {CIPHER}
  Compression no
  ControlMaster no
  LogLevel ERROR
""")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        self.sshd_log = d / "sshd.log"
        with open(self.sshd_log, "w") as err:
            p = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", d / "sshd_config"],
                                 stdout=subprocess.DEVNULL, stderr=err, preexec_fn=self.cg_sshd.enter)
        self.procs.append(p)
        self.sshd_pid = p.pid
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if p.poll() is not None:
                    sys.exit(f"compare.py: sshd exited:\n{self.sshd_log.read_text()}")
                time.sleep(0.05)
        self.ssh_cfg = ["-F", str(d / "ssh_config"), "-c", CIPHER]
        run(["ssh", *self.ssh_cfg, "bench", "true"])
        log(f"sshd pid {self.sshd_pid} on 127.0.0.1:{port}; {self.ssh_version()}")

    def _ssh_user(self) -> None:
        # Not root: sshd runs every command and the sftp subsystem through the user's login
        # shell, and root's ~/.bashrc on this machine runs `pyenv init` (~150 ms and ~0.1 s CPU
        # per connection), which would be charged to OpenSSH. A user with /bin/sh (dash, no start-
        # up files) and its home on the bench folder costs nothing extra; removed at the end if
        # this run created it.
        self.ssh_user = SSH_USER
        if subprocess.run(["getent", "passwd", SSH_USER], capture_output=True).returncode != 0:
            run(["useradd", "--system", "--no-create-home", "--home-dir", self.sshroot,
                 "--shell", "/bin/sh", "--comment", "bench/compare.py (OpenSSH peer)", SSH_USER])
            self.created_user = True
        else:
            run(["usermod", "--home", self.sshroot, "--shell", "/bin/sh", SSH_USER])
        # useradd leaves the password "!", which sshd without PAM takes for a locked account;
        # "*" is no password at all, so only the key gets in.
        run(["usermod", "--password", "*", SSH_USER])
        shutil.chown(self.sshroot, SSH_USER, SSH_USER)
        self.work.chmod(0o755)  # mkdtemp makes it 0700; the user must reach sshroot

    def own_sshroot(self) -> None:
        """Hands what setup put in the OpenSSH side's folder to the user that logs in there."""
        run(["chown", "-R", f"{SSH_USER}:{SSH_USER}", self.sshroot])

    def ssh_version(self) -> str:
        return subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        for cg in self.cgroups:
            cg.remove()
        if self.created_user:
            subprocess.run(["userdel", SSH_USER], capture_output=True)
        if self.args.keep:
            log(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- commands --------------------------------------------------------------------------------

    def xfer_cmd(self, *argv) -> list:
        return [str(self.xfer), "-q", *map(str, argv)]

    def ssh_tool(self, tool: str, *argv) -> list:
        return [tool, "-q", *self.ssh_cfg, *map(str, argv)] if tool != "ssh" else \
            ["ssh", *self.ssh_cfg, *map(str, argv)]

    def measure(self, tool: str, cmds: list, shell: bool = False) -> dict:
        """Runs cmds at once (one client process each) and returns wall seconds and the CPU of
        both ends. The caller has prepared and settled.

        Client CPU is the rusage that wait4 returns for each child, which includes every process
        the child waited for (scp's ssh, both sides of a shell pipeline). The client is not moved
        into a cgroup: a v1 migration waits for an RCU grace period, milliseconds that would land
        in the wall time. The server's CPU is its cgroup's delta (sshd's per-connection
        processes are born into it)."""
        server = self.cg_xferd if tool == "xfer" else self.cg_sshd
        env = self.xfer_env if tool == "xfer" else None
        errs = [tempfile.TemporaryFile(dir=self.work) for _ in cmds]
        s0 = server.usage_ns()
        t0 = time.perf_counter()
        procs = [subprocess.Popen(c, shell=shell, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=e)
                 for c, e in zip(cmds, errs)]
        codes, client_cpu = [], 0.0
        for p in procs:
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
            codes.append(p.returncode)
            client_cpu += ru.ru_utime + ru.ru_stime
        wall = time.perf_counter() - t0
        if tool != "xfer":
            # sshd's per-connection processes may outlive the client by a moment; their CPU counts.
            for _ in range(200):
                if self.cg_sshd.pids() <= {self.sshd_pid}:
                    break
                time.sleep(0.01)
        s1 = server.usage_ns()
        for code, c, e in zip(codes, cmds, errs):
            if code != 0:
                e.seek(0)
                sys.exit(f"compare.py: {c} exited {code}:\n{e.read().decode(errors='replace')}")
        for e in errs:
            e.close()
        return {"wall": wall, "client_cpu": client_cpu, "server_cpu": (s1 - s0) / 1e9}


# ----------------------------------------------------------------------------------------------
# targets: each returns {case: [per-round dicts]} and checks every copy


class Runner:
    def __init__(self, b: Bench, args):
        self.b, self.args = b, args
        self.results: dict[str, list[dict]] = {}

    def record(self, case: str, r: dict, nbytes: int) -> None:
        r["bytes"] = nbytes
        r["cpu_ns_per_byte"] = (r["client_cpu"] + r["server_cpu"]) * 1e9 / nbytes
        r["mib_s"] = nbytes / MIB / r["wall"]
        self.results.setdefault(case, []).append(r)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            sys.exit(f"compare.py: verification failed: {what}")

    def interleave(self, rnd: int, jobs: list) -> None:
        """Runs the jobs of one round, rotating the start so no tool always goes first."""
        k = rnd % len(jobs)
        for job in jobs[k:] + jobs[:k]:
            job()

    # -- 1. one big file ---------------------------------------------------------------------------

    def setup_big(self) -> None:
        b, n = self.b, self.args.big_mib * MIB
        self.big = b.local / "big.bin"
        write_random(self.big, n)
        run(b.xfer_cmd("mkdir", "up"), env=b.xfer_env)
        run(b.xfer_cmd("mkdir", "dl"), env=b.xfer_env)
        run(b.xfer_cmd("upload", self.big, "--to", "dl"), env=b.xfer_env)
        for d in ("up", "up_f", "dl"):
            (b.sshroot / d).mkdir()
        shutil.copy(self.big, b.sshroot / "dl" / "big.bin")
        b.own_sshroot()
        for d in ("xfer", "scp", "sftpf"):
            (b.down / d).mkdir()
        # sftp's -f asks for fsync of each file (fsync@openssh.com on upload, a local fsync on
        # download): OpenSSH with the durability xfer gives, as a reference beside plain scp.
        self.big_put_f = b.work / "big-put-f.batch"
        self.big_put_f.write_text(f"put -f {self.big} {b.sshroot / 'up_f' / 'big.bin'}\n")
        self.big_get_f = b.work / "big-get-f.batch"
        self.big_get_f.write_text(f"get -f {b.sshroot / 'dl' / 'big.bin'} {b.down / 'sftpf' / 'big.bin'}\n")

    def round_big(self, rnd: int) -> None:
        b, n = self.b, self.args.big_mib * MIB

        def up_xfer():
            dst = b.store / "up" / "big.bin"
            rm(dst)
            b.settle()
            self.record("big_up/xfer", b.measure("xfer", [b.xfer_cmd("upload", self.big, "--to", "up")]), n)
            self.check(same_file(self.big, dst), "xfer upload")

        def up_scp():
            dst = b.sshroot / "up" / "big.bin"
            rm(dst)
            b.settle()
            self.record("big_up/scp", b.measure("scp", [b.ssh_tool("scp", self.big, f"bench:{dst}")]), n)
            self.check(same_file(self.big, dst), "scp upload")

        def down_xfer():
            dst = b.down / "xfer" / "big.bin"
            rm(dst)
            b.settle()
            self.record("big_down/xfer",
                        b.measure("xfer", [b.xfer_cmd("download", "dl/big.bin", "--to", dst.parent)]), n)
            self.check(same_file(self.big, dst), "xfer download")

        def down_scp():
            dst = b.down / "scp" / "big.bin"
            rm(dst)
            b.settle()
            src = b.sshroot / "dl" / "big.bin"
            self.record("big_down/scp", b.measure("scp", [b.ssh_tool("scp", f"bench:{src}", dst)]), n)
            self.check(same_file(self.big, dst), "scp download")

        def sftp_f(case, dst, batch):
            def job():
                rm(dst)
                b.settle()
                self.record(case, b.measure("ssh", [b.ssh_tool("sftp", "-b", batch, "bench")]), n)
                self.check(same_file(self.big, dst), f"{case}")
            return job

        up_f = sftp_f("big_up/sftpf", b.sshroot / "up_f" / "big.bin", self.big_put_f)
        down_f = sftp_f("big_down/sftpf", b.down / "sftpf" / "big.bin", self.big_get_f)
        durable = not self.args.no_durable_peer
        self.interleave(rnd, [up_xfer, up_scp] + ([up_f] if durable else []))
        self.interleave(rnd, [down_xfer, down_scp] + ([down_f] if durable else []))

    # -- 2. many small files -------------------------------------------------------------------------

    def setup_small(self) -> None:
        b, a = self.b, self.args
        self.small = b.local / "small"
        per_dir = a.small_files // a.small_dirs
        for d in range(a.small_dirs):
            sub = self.small / f"d{d:02}"
            sub.mkdir(parents=True)
            for f in range(per_dir):
                (sub / f"f{f:04}.bin").write_bytes(os.urandom(a.small_kib * 1024))
        self.small_count = per_dir * a.small_dirs
        self.small_bytes = self.small_count * a.small_kib * 1024
        run(b.xfer_cmd("mkdir", "sup"), env=b.xfer_env)
        run(b.xfer_cmd("mkdir", "sdl"), env=b.xfer_env)
        run(b.xfer_cmd("upload", "-r", self.small, "--to", "sdl"), env=b.xfer_env)
        self.check(tree_equal(self.small, b.store / "sdl" / "small"), "xfer upload -r (setup)")
        for d in ("sup_sftp", "sup_sftpf", "sup_tar", "sdl"):
            (b.sshroot / d).mkdir()
        shutil.copytree(self.small, b.sshroot / "sdl" / "small")
        b.own_sshroot()
        for d in ("xfer_small", "sftp_small", "sftpf_small", "tar_small"):
            (b.down / d).mkdir()
        self.batch_put = b.work / "put.batch"
        self.batch_put.write_text(f"put -r {self.small} {b.sshroot / 'sup_sftp' / 'small'}\n")
        self.batch_get = b.work / "get.batch"
        self.batch_get.write_text(f"get -r {b.sshroot / 'sdl' / 'small'} {b.down / 'sftp_small' / 'small'}\n")
        self.batch_put_f = b.work / "put-f.batch"
        self.batch_put_f.write_text(f"put -r -f {self.small} {b.sshroot / 'sup_sftpf' / 'small'}\n")
        self.batch_get_f = b.work / "get-f.batch"
        self.batch_get_f.write_text(f"get -r -f {b.sshroot / 'sdl' / 'small'} {b.down / 'sftpf_small' / 'small'}\n")

    def round_small(self, rnd: int) -> None:
        b, n = self.b, self.small_bytes
        ssh = " ".join(b.ssh_tool("ssh"))

        def direction(way, verb):
            def make(tool, dst, cmds, shell=False):
                def job():
                    rm(dst)
                    b.settle()
                    self.record(f"small_{way}/{tool}", b.measure("xfer" if tool == "xfer" else "ssh", cmds, shell), n)
                    self.check(tree_equal(self.small, dst), f"{tool} {verb} of the small files")
                return job
            return make

        up, down = direction("up", "upload"), direction("down", "download")

        durable = not self.args.no_durable_peer
        self.interleave(rnd, [
            up("xfer", b.store / "sup" / "small", [b.xfer_cmd("upload", "-r", self.small, "--to", "sup")]),
            up("sftp", b.sshroot / "sup_sftp" / "small", [b.ssh_tool("sftp", "-b", self.batch_put, "bench")]),
            up("tar", b.sshroot / "sup_tar" / "small",
               [f"tar cf - -C {b.local} small | {ssh} bench tar xf - -C {b.sshroot / 'sup_tar'}"], shell=True),
        ] + ([up("sftpf", b.sshroot / "sup_sftpf" / "small",
                 [b.ssh_tool("sftp", "-b", self.batch_put_f, "bench")])] if durable else []))
        self.interleave(rnd, [
            down("xfer", b.down / "xfer_small" / "small",
                 [b.xfer_cmd("download", "-r", "sdl/small", "--to", b.down / "xfer_small")]),
            down("sftp", b.down / "sftp_small" / "small", [b.ssh_tool("sftp", "-b", self.batch_get, "bench")]),
            down("tar", b.down / "tar_small" / "small",
                 [f"{ssh} bench tar cf - -C {b.sshroot / 'sdl'} small | tar xf - -C {b.down / 'tar_small'}"],
                 shell=True),
        ] + ([down("sftpf", b.down / "sftpf_small" / "small",
                   [b.ssh_tool("sftp", "-b", self.batch_get_f, "bench")])] if durable else []))

    def count_syncs(self) -> None:
        """One untimed run of each small-files command under strace: how many fsync-class calls
        each side makes. The durability each tool gives is part of what its time buys."""
        b = self.b
        if not shutil.which("strace"):
            log("no strace: not counting fsync calls")
            return
        calls = "fsync,fdatasync,syncfs,sync,sync_file_range,msync"
        ssh = " ".join(b.ssh_tool("ssh"))
        jobs = [
            ("up", "xfer", b.store / "sup" / "small", b.xfer_cmd("upload", "-r", self.small, "--to", "sup")),
            ("up", "sftp", b.sshroot / "sup_sftp" / "small", b.ssh_tool("sftp", "-b", self.batch_put, "bench")),
            ("up", "sftpf", b.sshroot / "sup_sftpf" / "small",
             b.ssh_tool("sftp", "-b", self.batch_put_f, "bench")),
            ("up", "tar", b.sshroot / "sup_tar" / "small",
             ["sh", "-c", f"tar cf - -C {b.local} small | {ssh} bench tar xf - -C {b.sshroot / 'sup_tar'}"]),
            ("down", "xfer", b.down / "xfer_small" / "small",
             b.xfer_cmd("download", "-r", "sdl/small", "--to", b.down / "xfer_small")),
            ("down", "sftp", b.down / "sftp_small" / "small", b.ssh_tool("sftp", "-b", self.batch_get, "bench")),
            ("down", "sftpf", b.down / "sftpf_small" / "small",
             b.ssh_tool("sftp", "-b", self.batch_get_f, "bench")),
            ("down", "tar", b.down / "tar_small" / "small",
             ["sh", "-c", f"{ssh} bench tar cf - -C {b.sshroot / 'sdl'} small | tar xf - -C {b.down / 'tar_small'}"]),
        ]
        self.syncs = {}
        for d, tool, dst, cmd in jobs:
            rm(dst)
            os.sync()
            srv_out, cli_out = b.work / "strace-server.txt", b.work / "strace-client.txt"
            pid = b.xferd_pid if tool == "xfer" else b.sshd_pid
            tracer = subprocess.Popen(["strace", "-f", "-c", "-e", f"trace={calls}", "-o", str(srv_out),
                                       "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            # strace prints "attached" once it holds every thread; until then calls would be missed.
            seen = b""
            while b"attached" not in seen and tracer.poll() is None:
                seen += tracer.stderr.readline()
            run(["strace", "-f", "-c", "-e", f"trace={calls}", "-o", str(cli_out), *map(str, cmd)],
                env=b.xfer_env if tool == "xfer" else None)
            if tool != "xfer":
                for _ in range(200):
                    if b.cg_sshd.pids() <= {b.sshd_pid}:
                        break
                    time.sleep(0.01)
            tracer.send_signal(signal.SIGINT)
            tracer.wait()
            self.check(tree_equal(self.small, dst), f"{tool} small files under strace")
            self.syncs[f"{d}/{tool}"] = {"client": _strace_calls(cli_out), "server": _strace_calls(srv_out)}

    # -- 3. many clients at once ---------------------------------------------------------------------

    def setup_conc(self) -> None:
        b, a = self.b, self.args
        self.conc = []
        for i in range(a.conc_streams):
            p = b.local / f"c{i:02}.bin"
            write_random(p, a.conc_mib * MIB)
            self.conc.append(p)
        for d in ("c1", "cN"):
            run(b.xfer_cmd("mkdir", d), env=b.xfer_env)
            (b.sshroot / d).mkdir()
        b.own_sshroot()

    def round_conc(self, rnd: int) -> None:
        b, a = self.b, self.args
        one = a.conc_mib * MIB

        def job(tool, many):
            def go():
                files = self.conc if many else self.conc[:1]
                folder = "cN" if many else "c1"
                base = (b.store if tool == "xfer" else b.sshroot) / folder
                for f in files:
                    rm(base / f.name)
                b.settle()
                if tool == "xfer":
                    cmds = [b.xfer_cmd("upload", f, "--to", folder) for f in files]
                else:
                    cmds = [b.ssh_tool("scp", f, f"bench:{base / f.name}") for f in files]
                self.record(f"conc_{'many' if many else 'one'}/{tool}", b.measure(tool, cmds), one * len(files))
                for f in files:
                    self.check(same_file(f, base / f.name), f"{tool} concurrent upload of {f.name}")
            return go

        jobs = [job("xfer", False), job("xfer", True)]
        if not a.no_scp_conc:
            jobs += [job("scp", False), job("scp", True)]
        self.interleave(rnd, jobs)

    def cleanup_conc(self) -> None:
        for d in (self.b.store / "c1", self.b.store / "cN", self.b.sshroot / "c1", self.b.sshroot / "cN"):
            for f in d.iterdir():
                f.unlink()
        for f in self.conc:
            f.unlink()

    # -- 4. memory and latency -----------------------------------------------------------------------

    def status_kib(self, key: str) -> int:
        """A KiB figure of the daemon from /proc/PID/status (VmHWM: peak RSS, VmRSS: now)."""
        for line in Path(f"/proc/{self.b.xferd_pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {key} in /proc/{self.b.xferd_pid}/status")

    def run_rss(self) -> None:
        b, a = self.b, self.args
        size = a.rss_mib * MIB
        need = size * (a.rss_streams + 2)
        free = shutil.disk_usage(b.work).free
        if free < need:
            log(f"skipping RSS: {free // MIB} MiB free, {need // MIB} MiB needed (--rss-mib smaller)")
            return
        # The daemon that served every round so far: what a busy daemon holds afterwards.
        self.results["rss_after_rounds/xfer"] = [{
            "wall": 0.0, "client_cpu": 0.0, "server_cpu": 0.0, "bytes": 1, "cpu_ns_per_byte": 0.0, "mib_s": 0.0,
            "hwm_kib": self.status_kib("VmHWM"), "rss_kib": self.status_kib("VmRSS")}]
        src = b.local / "rss.bin"
        write_random(src, size)
        names = []
        for i in range(a.rss_streams):
            p = b.local / f"r{i:02}.bin"
            os.link(src, p)  # same bytes under distinct names: one source file on disk
            names.append(p)
        run(b.xfer_cmd("mkdir", "rss"), env=b.xfer_env)
        for rnd in range(a.rss_rounds):
            for many in (False, True):
                files = names if many else names[:1]
                for f in files:
                    rm(b.store / "rss" / f.name)
                b.restart_xferd()
                b.settle()
                startup = self.status_kib("VmHWM")
                # "5" resets the peak to the present RSS (Linux >= 4.0): what start-up touched
                # (and has freed since) does not hide the upload's own peak.
                Path(f"/proc/{b.xferd_pid}/clear_refs").write_text("5")
                before = self.status_kib("VmRSS")
                r = b.measure("xfer", [b.xfer_cmd("upload", f, "--to", "rss") for f in files])
                r.update(hwm_kib=self.status_kib("VmHWM"), startup_hwm_kib=startup, rss_before_kib=before)
                self.record(f"rss_{'many' if many else 'one'}/xfer", r, size * len(files))
                for f in files:
                    self.check((b.store / "rss" / f.name).stat().st_size == size, f"rss upload {f.name}")
                self.check(same_file(src, b.store / "rss" / files[0].name), "rss upload content")
                for f in files:
                    rm(b.store / "rss" / f.name)
        for f in names + [src]:
            f.unlink()

    def run_list(self) -> None:
        b, a = self.b, self.args
        run(b.xfer_cmd("mkdir", "ls"), env=b.xfer_env)
        for i in range(20):
            (b.store / "ls" / f"entry{i:02}").write_bytes(b"x" * i)
        for _ in range(3):
            b.measure("xfer", [[str(b.xfer), "list", "ls"]])
            b.measure("ssh", [b.ssh_tool("ssh", "bench", "true")])
        for i in range(a.list_runs):
            self.record("list/xfer", b.measure("xfer", [[str(b.xfer), "list", "ls"]]), 1)
            if i < a.ssh_true_runs:
                self.record("list/ssh_true", b.measure("ssh", [b.ssh_tool("ssh", "bench", "true")]), 1)

    # -- profile -------------------------------------------------------------------------------------

    def profile(self, out: Path) -> None:
        """perf record of the daemon through one big upload, three times: after a page-cache drop
        (as the timed runs), right after scp wrote a file of the same size and `sync` (its pages
        clean, still cached), and right after that scp with no sync (its pages still dirty)."""
        b = self.b
        if not shutil.which("perf"):
            log("no perf: skipping the profile")
            return
        summary = []
        reps = self.args.profile_reps
        for label, prep in (("caches dropped", "drop"), ("after scp wrote the same size, then sync", "scp"),
                            ("right after scp wrote the same size, no sync", "scp-nosync")):
            data = out / f"perf-{prep}.data"
            # DWARF unwinding: neither the Rust release build nor libc keeps frame pointers, and
            # "who calls memmove" is the question a profile of a copy-bound daemon must answer.
            perf = subprocess.Popen(["perf", "record", "-q", "-F", "999", "--call-graph", "dwarf,16384",
                                     "-p", str(b.xferd_pid), "-o", str(data)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            m = {"wall": 0.0, "server_cpu": 0.0, "client_cpu": 0.0}
            for _ in range(reps):
                rm(b.store / "up" / "big.bin")
                if prep.startswith("scp"):
                    rm(b.sshroot / "up" / "big.bin")
                    b.settle()
                    run(b.ssh_tool("scp", self.big, f"bench:{b.sshroot / 'up' / 'big.bin'}"))
                    if prep == "scp":
                        os.sync()
                else:
                    b.settle()
                one = b.measure("xfer", [b.xfer_cmd("upload", self.big, "--to", "up")])
                for k in m:
                    m[k] += one[k]
            perf.send_signal(signal.SIGINT)
            _, err = perf.communicate()
            if perf.returncode not in (0, -signal.SIGINT) or not data.exists():
                log(f"perf record failed: {err.decode(errors='replace')}")
                return

            def report(*extra):
                return subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", *extra],
                                      capture_output=True, text=True).stdout

            rep = report("--sort", "sym", "--percent-limit", "0.7", "-g", "none")
            top = [ln.rstrip() for ln in rep.splitlines() if "%" in ln and not ln.startswith("#")]
            samples = next((ln.lstrip("# ").strip() for ln in rep.splitlines() if ln.startswith("# Samples")), "")
            dsos = [ln.rstrip() for ln in report("--sort", "dso", "-g", "none").splitlines()
                    if "%" in ln and not ln.startswith("#")][:6]
            callers = []
            for sym in ("__memmove_avx512_unaligned_erms", "copy_folio_from_iter_atomic", "_copy_to_iter"):
                tree = report("--sort", "sym", "--symbols", sym, "-g", "caller,0.5,callee,function,percent",
                              "--percent-limit", "0.5")
                callers.append(f"callers of {sym}:\n" + _compact_callers(tree))
            summary.append(f"## daemon during {reps} x {self.args.big_mib} MiB upload, {label} ({samples})\n\n"
                           f"{reps} uploads: {m['wall']:.2f} s, daemon CPU {m['server_cpu']:.2f} s, client CPU "
                           f"{m['client_cpu']:.2f} s (under perf)\n\n"
                           "by binary:\n" + "\n".join(dsos) + "\n\ntop symbols (self):\n" +
                           "\n".join(top[:25]) + "\n\n" + "\n\n".join(callers) + "\n")
        (out / "profile.txt").write_text("\n".join(summary))
        log(f"profile summary in {out / 'profile.txt'}")


def _compact_callers(tree: str, frames: int = 6, width: int = 118) -> str:
    """A `perf report -g caller` tree, one block per branch: its share, then the nearest
    frames that are not inlined, long Rust names cut."""
    branches: list[tuple[str, list[str]]] = []
    total = ""
    for line in tree.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        body = line.strip().lstrip("|").strip()
        if not body or body == "|":
            continue
        if "%" in body and "[" in body and not branches:
            total = body.split()[0]
            continue
        if "--" in body and "%--" in body:
            pct, name = body.split("%--", 1)
            branches.append((pct.strip("-| ") + "%", [name.strip()]))
        elif body.startswith("---"):
            branches.append((total, [body.lstrip("-").strip()]))
        elif branches:
            branches[-1][1].append(body)
    out = []
    for pct, chain in branches:
        kept = [f for f in chain if "(inlined)" not in f and not f.startswith("0xffff")][:frames]
        cut = [f if len(f) <= width else f[: width - 3] + "..." for f in kept]
        out.append(f"  {pct:>7}  " + "\n           <- ".join(cut))
    return "\n".join(out) if out else "  (no call chains)"


def _strace_calls(path: Path) -> dict:
    """{syscall: calls} from an `strace -c` summary."""
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            out[parts[-1]] = int(parts[3])
    return out


# ----------------------------------------------------------------------------------------------
# the table and the chart


def paired(results, a: str, b: str, key: str) -> float:
    """Median over rounds of a's figure divided by b's from the same round: pairing cancels most
    of what a neighbour on the machine does to one round."""
    xs, ys = results.get(a, []), results.get(b, [])
    ratios = [x[key] / y[key] for x, y in zip(xs, ys)]
    return median(ratios)


def build_rows(res: dict, args, syncs: dict) -> list[dict]:
    rows = []

    def med(case, key):
        return median([r[key] for r in res.get(case, [])])

    def add(target, xv, pv, ratio, goal, met, group, short=""):
        rows.append({"target": target, "xfer": xv, "peer": pv, "ratio": ratio, "goal": goal,
                     "met": met, "group": group, "short": short})

    def ref(x, p, label, unit):
        if p not in res:
            return
        rt, rc = paired(res, x, p, "wall"), paired(res, x, p, "cpu_ns_per_byte")

        def fig(case):
            speed = f"{med(case, 'mib_s'):.0f} MiB/s" if unit == "MiB/s" else f"{med(case, 'wall'):.2f} s"
            cpu = med(case, "cpu_ns_per_byte")
            return f"{speed} ({cpu:.2f} ns/B)" if cpu < 20 else f"{speed} ({cpu:.0f} ns/B)"
        add(label, fig(x), f"sftp -f {fig(p)}", rt, "-", None, "ref")
        rows[-1]["ratio_text"] = f"{rt:.2f}x time, {rc:.2f}x CPU"

    big = f"{args.big_mib} MiB"
    for d, word in (("up", "upload"), ("down", "download")):
        x, p = f"big_{d}/xfer", f"big_{d}/scp"
        if x in res:
            r = paired(res, x, p, "wall")
            add(f"{big} {word}, wall", f"{med(x, 'mib_s'):.0f} MiB/s", f"scp {med(p, 'mib_s'):.0f} MiB/s",
                r, "time <= 0.4x", r <= 0.4, "ratio", f"big {d}\\ntime")
            r = paired(res, x, p, "cpu_ns_per_byte")
            xc = f"{med(x, 'cpu_ns_per_byte'):.2f} ns/B ({_split(res, x)})"
            pc = f"scp+sshd {med(p, 'cpu_ns_per_byte'):.2f} ns/B ({_split(res, p)})"
            add(f"{big} {word}, CPU client+server", xc, pc, r, "CPU <= 0.5x", r <= 0.5, "ratio", f"big {d}\\nCPU")
            ref(x, f"big_{d}/sftpf", f"(reference) {big} {word} vs sftp -f (fsync, durable like xfer)", "MiB/s")
    files = f"{args.small_files} x {args.small_kib} KiB in {args.small_dirs} folders"
    for d, word, sftp_word in (("up", "upload -r", "put -r"), ("down", "download -r", "get -r")):
        x = f"small_{d}/xfer"
        if x not in res:
            continue
        for peer, name, goal in (("sftp", f"sftp -b {sftp_word}", 0.25), ("tar", "tar \\| ssh tar", 0.5)):
            p = f"small_{d}/{peer}"
            r = paired(res, x, p, "wall")
            add(f"{files}, {word} vs {name}", f"{med(x, 'wall'):.2f} s ({med(x, 'cpu_ns_per_byte'):.0f} ns/B)",
                f"{med(p, 'wall'):.2f} s ({med(p, 'cpu_ns_per_byte'):.0f} ns/B)", r, f"time <= {goal}x",
                r <= goal, "ratio", f"files {d}\\nvs {peer}")
        ref(x, f"small_{d}/sftpf", f"(reference) {files}, {word} vs sftp -f {sftp_word} (fsync per file)", "s")
    for d, word in (("up", "upload -r"), ("down", "download -r")):
        if f"{d}/xfer" in syncs:
            def fmt(tool):
                c = syncs[f"{d}/{tool}"]
                return "client {} + server {}".format(*(sum(c[side].values()) for side in ("client", "server")))
            add(f"(durability) fsync-class calls in one {word}", fmt("xfer"),
                f"sftp: {fmt('sftp')}; sftp -f: {fmt('sftpf')}; tar: {fmt('tar')}", float("nan"), "-", None,
                "syncs")
    if "conc_many/xfer" in res:
        n = args.conc_streams
        r = paired(res, "conc_many/xfer", "conc_one/xfer", "mib_s")
        add(f"{n} concurrent {args.conc_mib} MiB uploads, aggregate vs 1 stream",
            f"{med('conc_many/xfer', 'mib_s'):.0f} MiB/s ({med('conc_many/xfer', 'cpu_ns_per_byte'):.2f} ns/B)",
            f"1 stream {med('conc_one/xfer', 'mib_s'):.0f} MiB/s ({med('conc_one/xfer', 'cpu_ns_per_byte'):.2f} ns/B)",
            r, ">= 0.9x", r >= 0.9, "conc")
        if "conc_many/scp" in res:
            r2 = paired(res, "conc_many/scp", "conc_one/scp", "mib_s")
            add("(for reference) scp, the same", "-", f"{n} scp {med('conc_many/scp', 'mib_s'):.0f} MiB/s vs "
                f"1 {med('conc_one/scp', 'mib_s'):.0f} MiB/s", r2, "-", None, "conc")
    for case, label, limit in (("rss_one/xfer", f"daemon peak RSS, one {args.rss_mib} MiB upload", 64),
                               ("rss_many/xfer",
                                f"daemon peak RSS, {args.rss_streams} x {args.rss_mib} MiB uploads at once", 128)):
        if case in res:
            hwm = max(r["hwm_kib"] for r in res[case]) / 1024
            before = max(r["rss_before_kib"] for r in res[case]) / 1024
            startup = max(r["startup_hwm_kib"] for r in res[case]) / 1024
            add(label, f"{hwm:.1f} MiB (VmHWM; fresh daemon: RSS {before:.1f} MiB before, start-up peak "
                f"{startup:.1f} MiB)", "-", hwm / limit, f"<= {limit} MiB", hwm <= limit, "rss")
    if "rss_after_rounds/xfer" in res:
        r0 = res["rss_after_rounds/xfer"][0]
        add("(reference) the daemon that served all the rounds above, before the RSS cases",
            f"RSS {r0['rss_kib'] / 1024:.1f} MiB, peak {r0['hwm_kib'] / 1024:.1f} MiB", "-", float("nan"), "-",
            None, "rss")
    if "list/xfer" in res:
        lx = med("list/xfer", "wall") * 1000
        ls = med("list/ssh_true", "wall") * 1000
        add("`xfer list` latency, median", f"{lx:.1f} ms", f"ssh true {ls:.0f} ms", lx / 10, "< 10 ms", lx < 10,
            "list")
    return rows


def _split(res, case) -> str:
    rs = res[case]
    c = median([r["client_cpu"] * 1e9 / r["bytes"] for r in rs])
    s = median([r["server_cpu"] * 1e9 / r["bytes"] for r in rs])
    return f"client {c:.2f} + server {s:.2f}"


def table_md(rows) -> str:
    out = ["| target | xfer | peer | ratio | goal | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        # Two decimals, three when rounding would hide which side of the goal a ratio is on.
        near = r["group"] == "ratio" and round(r["ratio"], 2) == float(r["goal"].split()[-1].rstrip("x"))
        ratio = "-" if r["group"] in ("rss", "list", "syncs") else r.get(
            "ratio_text", f"{r['ratio']:.3f}x" if near else f"{r['ratio']:.2f}x")
        out.append(f"| {r['target']} | {r['xfer']} | {r['peer']} | {ratio} | {r['goal']} | {met} |")
    return "\n".join(out) + "\n"


def details_md(res: dict) -> str:
    """Every case's spread, for whoever wants more than the medians."""
    out = ["| case | rounds | wall median (min-max) | MiB/s median | CPU client ns/B | CPU server ns/B |",
           "|---|---|---|---|---|---|"]
    for case, rs in res.items():
        if case == "rss_after_rounds/xfer":
            continue
        walls = [r["wall"] for r in rs]
        cli = median([r["client_cpu"] * 1e9 / r["bytes"] for r in rs])
        srv = median([r["server_cpu"] * 1e9 / r["bytes"] for r in rs])
        rate = f"{median([r['mib_s'] for r in rs]):.0f}" if rs[0]["bytes"] > 1 else "-"
        cpu = (f"{cli:.2f}", f"{srv:.2f}") if rs[0]["bytes"] > 1 else \
            (f"{cli / 1e6:.1f} ms", f"{srv / 1e6:.1f} ms")
        out.append(f"| {case} | {len(rs)} | {median(walls):.3f} s ({min(walls):.3f}-{max(walls):.3f}) | {rate} "
                   f"| {cpu[0]} | {cpu[1]} |")
    return "\n".join(out) + "\n"


def chart(res: dict, rows: list, args, path: Path, peer: str) -> None:
    if not shutil.which("gnuplot"):
        log("no gnuplot: no chart")
        return

    def med(case, key):
        return median([r[key] for r in res.get(case, [])])

    blocks = []
    d1 = []
    for r in rows:
        if r["group"] == "ratio":
            goal = float(r["goal"].split("<= ")[1].rstrip("x"))
            d1.append(f'"{r["short"]}\\n{r["ratio"]:.2f}x" {r["ratio"]:.3f} {goal}')
    blocks.append(("$ratios", d1))
    d2 = []
    for case, label in (("conc_one/xfer", "xfer 1"), ("conc_many/xfer", f"xfer {args.conc_streams}"),
                        ("conc_one/scp", "scp 1"), ("conc_many/scp", f"scp {args.conc_streams}")):
        if case in res:
            d2.append(f'"{label}\\n{med(case, "mib_s"):.0f} MiB/s" {med(case, "mib_s"):.1f}')
    blocks.append(("$conc", d2))
    d3 = []
    for case, label, limit in (("rss_one/xfer", f"1 x {args.rss_mib} MiB", 64),
                               ("rss_many/xfer", f"{args.rss_streams} x {args.rss_mib} MiB at once", 128)):
        if case in res:
            hwm = max(r["hwm_kib"] for r in res[case]) / 1024
            d3.append(f'"{label}\\n{hwm:.1f} MiB" {hwm:.1f} {limit}')
    blocks.append(("$rss", d3))
    d4 = []
    if "list/xfer" in res:
        lx, ls = med("list/xfer", "wall") * 1000, med("list/ssh_true", "wall") * 1000
        d4.append(f'"xfer list\\n{lx:.1f} ms" {lx:.2f} 10')
        d4.append(f'"ssh true\\n{ls:.0f} ms" {ls:.2f} NaN')
    blocks.append(("$lat", d4))
    script = ["set terminal pngcairo noenhanced size 1400,1000 font 'DejaVu Sans,10'", f"set output '{path}'"]
    for name, lines in blocks:
        script += [f"{name} << EOD", *(lines or ['"none" 0 0']), "EOD"]
    title = (f"xfer vs {peer} (aes128-gcm), loopback, {os.cpu_count()} cores, "
             f"medians of {args.rounds} rounds{' (QUICK sizes)' if args.quick else ''}")
    script += [
        f"set multiplot title \"{title}\"",
        "set style data histograms", "set style histogram clustered gap 1", "set style fill solid 0.8 border -1",
        "set boxwidth 0.9", "set grid ytics", "set bmargin 4", "set yrange [0:*]", "set xtics scale 0 font ',9'",
        "set key top left",
        # the ratios across the top, the absolute targets in three panels below
        "set origin 0,0.48", "set size 1,0.48",
        "set title 'xfer / OpenSSH peer, paired per round (lower is better; dashed: as fast as the peer)'",
        "set arrow 1 from graph 0, first 1 to graph 1, first 1 nohead dt 2 lc rgb '#808080'",
        "plot $ratios using 2:xtic(1) title 'measured' lc rgb '#3060c0', '' using 3 title 'goal' lc rgb '#40a040'",
        "unset arrow 1",
        "set size 0.333,0.48", "set origin 0,0",
        f'set title "{args.conc_streams} concurrent {args.conc_mib} MiB uploads, aggregate MiB/s\\n'
        f'(goal: xfer {args.conc_streams} >= 0.9 x xfer 1)"',
        "set tmargin 3",
        "set key off",
        "plot $conc using 2:xtic(1) lc rgb '#3060c0'",
        "set key top left", "set origin 0.333,0",
        "set title 'xferd peak RSS (VmHWM), MiB'",
        "plot $rss using 2:xtic(1) title 'measured' lc rgb '#3060c0', '' using 3 title 'limit' lc rgb '#40a040'",
        "set origin 0.666,0",
        "set title 'One command, median ms (log; goal: xfer list < 10 ms)'",
        "set logscale y", "set yrange [0.5:*]",
        "plot $lat using 2:xtic(1) title 'measured' lc rgb '#3060c0', '' using 3 title 'goal' lc rgb '#40a040'",
        "unset multiplot",
    ]
    gp = subprocess.run(["gnuplot"], input="\n".join(script) + "\n", text=True, capture_output=True)
    if gp.returncode != 0:
        log(f"gnuplot failed: {gp.stderr}")
    else:
        log(f"chart: {path}")


# ----------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": os.uname().release,
            "mem_mib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MIB,
            "git": rev.stdout.strip(), "loadavg_start": os.getloadavg()}


def rerender(results: Path, out: Path, chart_path) -> None:
    """The table, details and chart again from a results.json (after a change to this script)."""
    d = json.loads(results.read_text())
    run_args = argparse.Namespace(**d["args"])
    rows = build_rows(d["rounds"], run_args, d.get("syncs", {}))
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table_md(rows))
    (out / "details.md").write_text(details_md(d["rounds"]))
    chart(d["rounds"], rows, run_args, Path(chart_path) if chart_path else out / "compare.png",
          d["machine"]["ssh"].split(",")[0])
    print(table_md(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 rounds: a smoke check (~1 min)")
    ap.add_argument("--rounds", type=int, help="rounds of each interleaved target (default 5; quick 2)")
    ap.add_argument("--only", default="big,small,conc,rss,list",
                    help="comma list of targets: big,small,conc,rss,list (default: all)")
    ap.add_argument("--big-mib", type=int, help="big file size (default 512; quick 32)")
    ap.add_argument("--small-files", type=int, help="number of small files (default 1000; quick 200)")
    ap.add_argument("--small-dirs", type=int, default=20, help="folders the small files spread over (20)")
    ap.add_argument("--small-kib", type=int, default=4, help="size of each small file (4 KiB)")
    ap.add_argument("--conc-streams", type=int, default=16, help="concurrent uploads (16)")
    ap.add_argument("--conc-mib", type=int, help="size of each concurrent upload (default 64; quick 4)")
    ap.add_argument("--no-durable-peer", action="store_true",
                    help="skip the reference runs of sftp -f (fsync per file, as xfer does)")
    ap.add_argument("--no-syncs", action="store_true", help="skip counting fsync calls under strace")
    ap.add_argument("--no-scp-conc", action="store_true", help="skip the scp reference for concurrency")
    ap.add_argument("--rss-mib", type=int, help="upload size for the peak-RSS cases (default 1024; quick 64)")
    ap.add_argument("--rss-streams", type=int, default=16, help="concurrent uploads for peak RSS (16)")
    ap.add_argument("--rss-rounds", type=int, default=1, help="rounds of the RSS cases (1; the max is kept)")
    ap.add_argument("--list-runs", type=int, help="`xfer list` runs (default 50; quick 10)")
    ap.add_argument("--ssh-true-runs", type=int, default=10, help="`ssh true` runs for comparison (10)")
    ap.add_argument("--drop", choices=["auto", "global", "files", "none"], default="auto",
                    help="page-cache drop before each measured command: drop_caches (auto when "
                         "writable), fadvise on the bench files, or sync only")
    ap.add_argument("--workdir", default="/var/tmp", help="parent of the temp folder (must be the VM disk)")
    ap.add_argument("--allow-tmpfs", action="store_true", help="allow --workdir on tmpfs")
    ap.add_argument("--out", default=str(REPO / "bench" / "out"), help="results.json, table.md, chart")
    ap.add_argument("--chart", help="PNG path (default OUT/compare.png)")
    ap.add_argument("--profile", action="store_true", help="perf record the daemon through a big upload")
    ap.add_argument("--profile-reps", type=int, default=3, help="uploads per profiled case (3)")
    ap.add_argument("--no-build", action="store_true", help="use the release binaries as they are")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    ap.add_argument("--report", metavar="RESULTS_JSON",
                    help="measure nothing: print the table and redraw the chart of an earlier run")
    args = ap.parse_args()
    if args.report:
        rerender(Path(args.report), Path(args.out), args.chart)
        return
    q = args.quick
    args.rounds = args.rounds or (2 if q else 5)
    args.big_mib = args.big_mib or (32 if q else 512)
    args.small_files = args.small_files or (200 if q else 1000)
    args.conc_mib = args.conc_mib or (4 if q else 64)
    args.rss_mib = args.rss_mib or (64 if q else 1024)
    args.list_runs = args.list_runs or (10 if q else 50)
    only = set(args.only.split(","))
    if os.geteuid() != 0:
        sys.exit("compare.py: run as root (cgroups, drop_caches, sshd)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chart_path = Path(args.chart) if args.chart else out / "compare.png"

    info = machine()
    started = time.time()
    b = Bench(args)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        b.build()
        b.start_xferd()
        b.start_sshd()
        info.update({"ssh": b.ssh_version(), "workdir_fs": b.fs, "workdir": str(b.work),
                     "cpu_accounting": b.cg_xferd.kind, "page_cache": b.drop_method})
        log(f"CPU by {b.cg_xferd.kind}; before each measured command: {b.drop_method}")
        r = Runner(b, args)
        setups = {"big": r.setup_big, "small": r.setup_small, "conc": r.setup_conc}
        rounds = {"big": r.round_big, "small": r.round_small, "conc": r.round_conc}
        active = [t for t in ("big", "small", "conc") if t in only]
        for t in active:
            setups[t]()
        meter = MachineMeter([b.cg_xferd, b.cg_sshd])
        for rnd in range(args.rounds):
            log(f"round {rnd + 1}/{args.rounds} (load {os.getloadavg()[0]:.2f})")
            for t in active:
                rounds[t](rnd)
            m = meter.round()
            info.setdefault("per_round", []).append(m)
            log(f"round {rnd + 1}: other work {m['others_pct']:.0f}% of the machine, this run "
                f"{m['own_pct']:.0f}%, steal {m['steal_pct']:.0f}%")
        if "small" in active and not args.no_syncs:
            log("counting fsync calls of the small-files commands (strace, untimed)")
            r.count_syncs()
        if "conc" in active:
            r.cleanup_conc()
        if "rss" in only:
            log("peak RSS")
            r.run_rss()
        if "list" in only:
            log("list latency")
            r.run_list()
        if args.profile and "big" in active:
            r.profile(out)
        info["loadavg_end"] = os.getloadavg()
        info["whole_run"] = meter.since(meter.start)
        info["seconds"] = round(time.time() - started)
        rows = build_rows(r.results, args, getattr(r, "syncs", {}))
        md = table_md(rows)
        (out / "results.json").write_text(json.dumps(
            {"when": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:],
             "machine": info, "args": vars(args), "rows": rows, "syncs": getattr(r, "syncs", {}),
             "rounds": r.results}, indent=1, default=str))
        (out / "table.md").write_text(md)
        (out / "details.md").write_text(details_md(r.results))
        chart(r.results, rows, args, chart_path, info["ssh"].split(",")[0])
        print()
        print(f"xfer {info['git']} vs {info['ssh']}; {info['nproc']} x {info['cpu']}, kernel {info['kernel']}")
        print(f"storage: {b.fs} ({b.work}); CPU: {b.cg_xferd.kind}; caches: {b.drop_method}")
        print(f"rounds: {args.rounds}{' (QUICK sizes: goals are for the full sizes)' if q else ''}; "
              f"load average {info['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at end; "
              f"{info['seconds']} s")
        w = info["whole_run"]
        print(f"CPU of the whole machine over the run: other work {w['others_pct']:.0f}% (includes kernel "
              f"writeback), this run {w['own_pct']:.0f}%, steal {w['steal_pct']:.0f}%; per round, other work: "
              + " ".join(f"{m['others_pct']:.0f}%" for m in info.get("per_round", [])))
        print()
        print(md)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
    finally:
        b.stop()


if __name__ == "__main__":
    main()
