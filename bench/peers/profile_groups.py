#!/usr/bin/env python3
"""Instructions per request from a callgrind dump, by group of code, for
bench/profile.sh. Standard library only (reads callgrind_annotate's
output).

  profile_groups.py CALLGRIND_FILE REQUESTS LABEL

Each function's own instructions (exclusive) go to the first group whose
pattern its name or file matches; the groups are the layers a request
crosses. Prints the total per request and each group's share, then the
functions costing most per request.
"""
import re
import subprocess
import sys

# (group, pattern over "file:function"), first match wins.
GROUPS = [
    ("crypto (aws-lc: AES-GCM, SHA, RSA)", r"aws_lc|aws-lc|/crypto/|bn_|sha256|gcm|aes_|ring::"),
    ("TLS records (rustls)", r"rustls"),
    ("HTTP/1 and HTTP/2 (hyper, h2, httparse, http)", r"hyper|/h2-|\bh2::|httparse|/http-[0-9]|\bhttp::|want::"),
    ("tokio (scheduler, I/O driver, timers)", r"tokio|mio::"),
    ("logging and spans (tracing)", r"tracing|sharded_slab|matchers|regex|nu_ansi"),
    ("metrics (prometheus-client)", r"prometheus"),
    ("caches (moka)", r"moka|crossbeam|quanta|tagptr"),
    ("JSON and JWT (serde_json: the upstream body's check; jsonwebtoken)", r"jsonwebtoken|serde|base64"),
    ("allocation (jemalloc, malloc)", r"jemalloc|_rjem_|je_|malloc|free|realloc|calloc|sdallocx|mallocx"),
    ("memory copies (libc memcpy/memmove/memset)", r"mem(cpy|move|set|cmp)|__memcpy|__memmove|__memset|strlen"),
    ("time (time, clock_gettime, vdso)", r"clock_gettime|vdso|/time-[0-9]|\btime::|OffsetDateTime"),
    ("the gateway's own code", r"koodrive_gateway|/src/(pipeline|record|cache|upstream|jobs|auth|token|trace_id|language|metrics|error|server|http_client|audit)"),
    ("futures, tower, bytes", r"futures|tower|bytes::|/bytes-"),
    ("Rust std (fmt, collections, sync)", r"/rustc/|core::|alloc::|std::"),
]


def main(argv):
    path, requests, label = argv[1], int(argv[2]), argv[3]
    text = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--inclusive=no", "--auto=no", path],
        check=True, capture_output=True, text=True).stdout
    total = None
    functions = []
    line_re = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(.*)$")
    for line in text.splitlines():
        m = line_re.match(line)
        if not m:
            continue
        ir = int(m.group(1).replace(",", ""))
        name = m.group(2).strip()
        if name.startswith("PROGRAM TOTALS"):
            total = ir
        elif total is not None and ":" in name and ir < total * 0.9:
            # (Frames that were active when the counters were zeroed show
            # the whole total as their own: thread starts, the worker loop.)
            functions.append((ir, name))
    if total is None:
        sys.exit(f"no totals in {path}")
    groups = {g: 0 for g, _ in GROUPS}
    groups["other"] = 0
    compiled = [(g, re.compile(p)) for g, p in GROUPS]
    for ir, name in functions:
        for group, pattern in compiled:
            if pattern.search(name):
                groups[group] += ir
                break
        else:
            groups["other"] += ir
    print(f"{label}: {total / requests:,.0f} instructions per request ({path})")
    for group, ir in sorted(groups.items(), key=lambda kv: -kv[1]):
        if ir:
            print(f"  {ir / requests:>9,.0f}  {100 * ir / total:5.1f} %  {group}")
    print("  top functions (own instructions per request):")
    for ir, name in sorted(functions, reverse=True)[:25]:
        print(f"  {ir / requests:>9,.0f}  {shorten(name)[:120]}")


def shorten(name):
    """file:function without the registry's and toolchain's long prefixes."""
    name = re.sub(r"^.*?/index\.crates\.io-[0-9a-f]+/", "", name)
    name = re.sub(r"^/rustc/[0-9a-f]+/library/", "std:", name)
    return re.sub(r" \[[^]]*\]$", "", name)


if __name__ == "__main__":
    main(sys.argv)
