#!/usr/bin/env python3
"""The container image's runtime, without a container engine.

Reads the Dockerfile's final stage, lays out the files its COPY lines put in
the image (the built binary standing in for the build stage's, the shared
libraries it links beside it) in a scratch root, and runs the image's
ENTRYPOINT + CMD there the way the image would: chrooted, as its USER
(uid/gid, no supplementary groups), in its WORKDIR, in a network namespace
of its own. Everything but the directories the COPY lines hand to that
user is owned by root, so the process can write nowhere else; there is no
/tmp, /proc or /dev, as under a read-only root filesystem.

Checks: the final stage holds only instructions reproduced here; the
build context (after .dockerignore) carries no private key and every file
a COPY names, and cargo can load the package from it alone; the binary
links only libraries a Debian slim base has; the demo starts as the
non-root user and creates its development material in its working
directory; /readyz answers 200 and the jobs endpoint 200 over HTTPS on the
EXPOSEd ports (which are the demo config's); the HEALTHCHECK command
succeeds against it and fails once it has stopped; SIGTERM exits 0; and
the same image with its working directory read-only too (the development
material already there) still starts and serves.

Usage (as root; skipped otherwise): .ci/image-layout.py target/debug/koodrive-gateway
"""

import fnmatch
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import http.client
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The build stage's outputs the final stage may copy: the binary, and empty
# directories the build stage makes with `mkdir -p`.
BUILT_BINARY = "/src/target/release/koodrive-gateway"
# Libraries a Debian slim base provides (libc6, libgcc-s1).
BASE_LIBRARIES = {
    "linux-vdso.so.1", "libc.so.6", "libm.so.6", "libgcc_s.so.1",
    "libpthread.so.0", "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
}
# Split so that this file does not match itself.
PEM_PRIVATE_KEY = b"PRIVATE " + b"KEY-----"
REPRODUCED = {"FROM", "COPY", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK",
              "ENTRYPOINT", "CMD", "ENV", "LABEL"}


def fail(message):
    print(f"image-layout: FAIL: {message}", flush=True)
    sys.exit(1)


def instructions(text):
    """(KEYWORD, rest) per instruction: comments dropped, continuations joined."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def stages(items):
    result = []
    for keyword, rest in items:
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, rest))
    return result


def flags(rest):
    """--flag=value options in front of an instruction's arguments."""
    words = shlex.split(rest) if not rest.lstrip().startswith("[") else []
    options = {}
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        options[name] = value
    return options, words


def ignored(rel, patterns):
    """Whether .dockerignore excludes `rel` (last match wins; a directory
    pattern covers what is under it)."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = rel.split("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def context_files():
    patterns = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.strip().startswith("#")]
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    untracked_keys = [str(p.relative_to(REPO)) for p in (REPO / "certs").rglob("*") if p.is_file()]
    return {f for f in set(tracked) | set(untracked_keys) if not ignored(f, patterns)}


def chown_tree(path, uid, gid):
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def make_dirs(root, path):
    """Creates `path` under `root` like Docker: missing parents root-owned, 0755."""
    target = root / path.lstrip("/")
    target.mkdir(parents=True, exist_ok=True, mode=0o755)
    return target


def lay_out(final, build_stage, binary, root, context):
    image = {"env": {}, "workdir": "/", "user": (0, 0), "expose": [], "writable": []}
    build_runs = " ".join(rest for keyword, rest in build_stage if keyword == "RUN")
    for keyword, rest in final:
        if keyword not in REPRODUCED:
            fail(f"the final stage has `{keyword}`, which this check cannot reproduce")
        if keyword == "COPY":
            options, words = flags(rest)
            *sources, dest = words
            owner = tuple(int(x) for x in options.get("chown", "0:0").split(":"))
            for source in sources:
                if options.get("from") == "build":
                    if source == BUILT_BINARY:
                        target = make_dirs(root, os.path.dirname(dest))
                        shutil.copy2(binary, root / dest.lstrip("/"))
                        copied = root / dest.lstrip("/")
                    elif f"mkdir -p {source}" in build_runs:
                        copied = make_dirs(root, dest)
                    else:
                        fail(f"COPY --from=build {source}: not an output this check knows")
                elif "from" in options:
                    fail(f"COPY --from={options['from']}: unknown stage")
                else:
                    files = sorted(f for f in context if f == source or f.startswith(source + "/"))
                    if not files:
                        fail(f"COPY {source}: not in the build context (.dockerignore?)")
                    if files == [source]:
                        target = root / dest.lstrip("/")
                        make_dirs(root, os.path.dirname(dest))
                        shutil.copy2(REPO / source, target)
                        copied = target
                    else:
                        copied = make_dirs(root, dest)
                        for f in files:
                            target = copied / f[len(source) + 1:]
                            target.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(REPO / f, target)
                chown_tree(copied, *owner)
                if owner != (0, 0):
                    image["writable"].append("/" + dest.lstrip("/"))
        elif keyword == "WORKDIR":
            make_dirs(root, rest)
            image["workdir"] = rest
        elif keyword == "USER":
            uid, _, gid = rest.partition(":")
            if not uid.isdigit() or not gid.isdigit():
                fail(f"USER {rest}: give a numeric uid:gid (the base has no such user)")
            image["user"] = (int(uid), int(gid))
        elif keyword == "EXPOSE":
            image["expose"] += [int(p.split("/")[0]) for p in rest.split()]
        elif keyword == "HEALTHCHECK":
            options, _ = flags(rest.split(" CMD ")[0])
            image["healthcheck"] = json.loads(rest.split(" CMD ", 1)[1])
            image["healthcheck_options"] = options
        elif keyword in ("ENTRYPOINT", "CMD"):
            image[keyword.lower()] = json.loads(rest)
        elif keyword == "ENV":
            name, _, value = rest.partition("=")
            image["env"][name] = value
    return image


def link_libraries(binary, root):
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        name = line.split()[0]
        if os.path.basename(name) not in BASE_LIBRARIES:
            fail(f"the binary links {name}, which a slim base does not have")
        path = line.split("=>")[-1].split("(")[0].strip()
        if path.startswith("/"):
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def inside(root, image):
    """A preexec function entering the image as its processes run: chrooted
    to its files, in its working directory, as its user with no groups."""
    uid, gid = image["user"]

    def enter():
        os.chroot(root)
        os.chdir(image["workdir"])
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return enter


def start(root, image, log):
    return subprocess.Popen(image["entrypoint"] + image["cmd"], preexec_fn=inside(root, image),
                            env=dict(image["env"]), stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)


def wait_for_port(port, process, log_path, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            fail(f"the gateway exited with {process.returncode}:\n{Path(log_path).read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    fail(f"nothing listens on {port} after {seconds} s:\n{Path(log_path).read_text()}")


def get(port, path, headers=None, tls=None):
    if tls:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=10)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read().decode()


def healthcheck(root, image):
    """The HEALTHCHECK command, run inside the image as Docker runs it."""
    return subprocess.run(image["healthcheck"], preexec_fn=inside(root, image),
                          env=dict(image["env"]), capture_output=True, timeout=10).returncode


def serve_and_check(root, image, config, writable, scratch, label):
    log_path = scratch / f"{label}.log"
    with open(log_path, "w") as log:
        process = start(root, image, log)
    try:
        listen = int(config["server"]["listen"].rsplit(":", 1)[1])
        admin = int(config["server"]["admin_listen"].rsplit(":", 1)[1])
        wait_for_port(listen, process, log_path)
        status, body = get(admin, "/readyz")
        if status != 200:
            fail(f"{label}: /readyz {status} {body}")
        if healthcheck(root, image) != 0:
            fail(f"{label}: the HEALTHCHECK command failed against a running gateway")
        uid, gid = image["user"]
        token = subprocess.run(
            image["entrypoint"] + ["dev-token", "--config", image["cmd"][-1], "--user", "u-1001"],
            preexec_fn=inside(root, image), env=dict(image["env"]), capture_output=True, text=True)
        if token.returncode != 0:
            fail(f"{label}: dev-token: {token.stderr}")
        ca = root / config["server"]["dev_certs_dir"].lstrip("/") / "ca.crt"
        tls = ssl.create_default_context(cafile=str(ca))
        status, body = get(listen, "/koodrive/ose/v1/jobs?offset=0&limit=2",
                           {"Authorization": f"Bearer {token.stdout.strip()}"}, tls)
        if status != 200 or len(json.loads(body)["data"]) != 2:
            fail(f"{label}: jobs {status} {body}")
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
        if code != 0:
            fail(f"{label}: exit code {code} after SIGTERM:\n{log_path.read_text()}")
        if healthcheck(root, image) == 0:
            fail(f"{label}: the HEALTHCHECK command succeeds with no gateway running")
        print(f"image-layout: {label}: started as {uid}:{gid}, /readyz 200, jobs 200 over "
              f"HTTPS, HEALTHCHECK ok, SIGTERM exit 0", flush=True)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def main():
    if len(sys.argv) != 2:
        fail("usage: image-layout.py BINARY")
    binary = os.path.abspath(sys.argv[1])
    dockerfile = (REPO / "Dockerfile").read_text()
    all_stages = stages(instructions(dockerfile))
    final, build_stage = all_stages[-1], all_stages[0]

    context = context_files()
    for f in sorted(context):
        path = REPO / f
        if path.is_file() and PEM_PRIVATE_KEY in path.read_bytes():
            fail(f"{f} holds a private key and is in the build context")
    patterns = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.strip().startswith("#")]
    for never in ("target/release/koodrive-gateway", ".git/config", "certs/dev/server.key",
                  "certs/dev/jwt.key"):
        if not ignored(never, patterns):
            fail(f"{never} would be in the build context (.dockerignore)")

    for stage in all_stages:
        for keyword, rest in stage:
            options, words = flags(rest)
            if keyword in ("COPY", "ADD") and "from" not in options:
                for source in words[:-1]:
                    if not any(f == source or f.startswith(source + "/") for f in context):
                        fail(f"{keyword} {source}: not in the build context (.dockerignore?)")

    # The build stage's cargo sees only the context: its manifest must
    # resolve there, every target file present, the lock file current.
    with tempfile.TemporaryDirectory(prefix="image-context-") as copy:
        for f in context:
            if (REPO / f).is_file():
                (Path(copy) / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / f, Path(copy) / f)
        # `cargo metadata` does not look for target files; `cargo build`
        # does, before it compiles anything: asked for a bin that does not
        # exist, it stops with that complaint only if the manifest loaded.
        probe = subprocess.run(["cargo", "build", "--release", "--locked", "--offline",
                                "--bin", "no-such-bin"], cwd=copy, capture_output=True,
                               text=True, env=dict(os.environ, CARGO_TARGET_DIR=f"{copy}/target"))
        if "no bin target named `no-such-bin`" not in probe.stderr:
            fail(f"cargo in the build context: {probe.stderr.strip()}")

    if os.geteuid() != 0:
        print("image-layout: SKIPPED: needs root (chroot and a uid of the image's own)")
        return
    for tool in ("unshare", "ip", "ldd"):
        if shutil.which(tool) is None:
            fail(f"`{tool}` is not installed (util-linux, iproute2, libc-bin)")
    if not os.environ.get("IMAGE_LAYOUT_NETNS"):
        # Its own network namespace: the image's fixed ports collide with
        # nothing on this machine.
        os.environ["IMAGE_LAYOUT_NETNS"] = "1"
        probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
        if probe.returncode != 0:
            fail(f"cannot make a network namespace (unshare --net: {probe.stderr.strip()}); "
                 "the check needs CAP_SYS_ADMIN")
        os.execvp("unshare", ["unshare", "--net", "--", sys.executable, __file__, binary])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    with tempfile.TemporaryDirectory(prefix="image-layout-") as scratch:
        scratch = Path(scratch)
        root = scratch / "root"
        root.mkdir(mode=0o755)
        image = lay_out(final, build_stage, binary, root, context)
        link_libraries(binary, root)
        if image["user"][0] == 0:
            fail("the image runs as root")
        if not image.get("healthcheck"):
            fail("no HEALTHCHECK")
        config_path = image["cmd"][-1]
        if image.get("cmd", [None])[-2:-1] != ["--config"]:
            fail("CMD does not name its config with --config")
        if not (root / config_path.lstrip("/")).is_file():
            fail(f"the default command's config {config_path} is not in the image")
        config = tomllib.loads((root / config_path.lstrip("/")).read_text())
        ports = {int(config["server"][k].rsplit(":", 1)[1]) for k in ("listen", "admin_listen")}
        if set(image["expose"]) != ports:
            fail(f"EXPOSE {image['expose']} but the demo listens on {sorted(ports)}")
        for key in ("listen", "admin_listen"):
            if not config["server"][key].startswith("0.0.0.0:"):
                fail(f"server.{key} = {config['server'][key]}: a published port cannot reach it")
        dev = config["server"]["dev_certs_dir"]
        if not any(dev == w or dev.startswith(w + "/") for w in image["writable"]):
            fail(f"dev_certs_dir {dev} is not in a directory the user may write")

        serve_and_check(root, image, config, image["writable"], scratch, "demo")
        created = sorted(str(p.relative_to(root)) for p in (root / dev.lstrip("/")).iterdir())
        print(f"image-layout: created in the container, not the image: {created}")

        # Read-only root filesystem, writable directory included.
        for directory in image["writable"]:
            chown_tree(root / directory.lstrip("/"), 0, 0)
            for dirpath, dirs, files in os.walk(root / directory.lstrip("/")):
                os.chmod(dirpath, 0o555)
                for name in files:
                    os.chmod(os.path.join(dirpath, name), 0o444)
        serve_and_check(root, image, config, [], scratch, "read-only")
    print("image-layout: ok")


if __name__ == "__main__":
    main()
