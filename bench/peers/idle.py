#!/usr/bin/env python3
"""Idle TLS keep-alive connections, for bench/compare.sh's memory rows.

  idle.py HOST PORT CA_FILE PATH TOKEN STAGE...

Opens connections until STAGE connections are open (each: TLS handshake,
one GET with the token, the response read, then left open and idle),
prints "READY <n> <failures>" and waits for a line on standard input before
the next stage; after the last stage's line, closes everything and exits.
"""
import asyncio
import resource
import ssl
import sys

OPENING_AT_ONCE = 100


async def open_one(host, port, context, request):
    reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname="localhost")
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    if status != 200:
        writer.close()
        raise RuntimeError(f"status {status}")
    return writer


async def main(argv):
    host, port, ca, path, token = argv[1], int(argv[2]), argv[3], argv[4], argv[5]
    stages = [int(s) for s in argv[6:]]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    context = ssl.create_default_context(cafile=ca)
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Authorization: Bearer {token}\r\n\r\n").encode()
    gate = asyncio.Semaphore(OPENING_AT_ONCE)
    open_writers, failures = [], 0

    async def one():
        nonlocal failures
        async with gate:
            try:
                open_writers.append(await asyncio.wait_for(open_one(host, port, context, request), 30))
            except (OSError, RuntimeError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError) as e:
                failures += 1
                if failures <= 3:
                    print(f"connection failed: {e!r}", file=sys.stderr)

    loop = asyncio.get_running_loop()
    for stage in stages:
        await asyncio.gather(*(one() for _ in range(stage - len(open_writers) - failures)))
        print(f"READY {len(open_writers)} {failures}", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
    for writer in open_writers:
        writer.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv))
