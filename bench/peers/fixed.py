#!/usr/bin/env python3
"""A fixed number of requests over keep-alive TLS connections, for
bench/profile.sh (instructions per request need an exact count, which a
timed load generator cannot give). Standard library only.

  fixed.py HOST PORT CA_FILE PATH TOKEN WARMUP COUNT CONNECTIONS [EXPECT_X_CACHE]

Opens CONNECTIONS TLS connections (HTTP/1.1, one thread each, so the
gateway sees them concurrently, as under load), sends WARMUP requests in
all over them, prints "READY" and waits for a line on standard input (so
that the caller can start counting after the handshakes), then sends
COUNT requests in all over the same connections and prints "DONE
<requests>". Every answer must be a 200 (and carry `X-Cache:
EXPECT_X_CACHE` when given), else it exits non-zero.
"""
import socket
import ssl
import sys
import threading


def read_response(sock, buffer):
    """One response: (status, headers dict, rest of the buffer)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed")
        buffer += chunk
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"0"))
    while len(buffer) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed in the body")
        buffer += chunk
    return status, headers, buffer[length:]


def main(argv):
    host, port, ca, path, token = argv[1], int(argv[2]), argv[3], argv[4], argv[5]
    warmup, count, connections = int(argv[6]), int(argv[7]), int(argv[8])
    expect_cache = argv[9].encode() if len(argv) > 9 and argv[9] else None
    context = ssl.create_default_context(cafile=ca)
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Authorization: Bearer {token}\r\n\r\n").encode()
    errors = []
    done = [0] * connections

    warmed = threading.Barrier(connections + 1)
    go = threading.Event()

    def exchange(sock, buffer):
        sock.sendall(request)
        status, headers, buffer = read_response(sock, buffer)
        if status != 200:
            raise RuntimeError(f"status {status}")
        if expect_cache and headers.get(b"x-cache") != expect_cache:
            raise RuntimeError(f"X-Cache {headers.get(b'x-cache')!r}")
        return buffer

    def worker(index, warm, requests):
        try:
            raw = socket.create_connection((host, port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                buffer = b""
                for _ in range(warm):
                    buffer = exchange(sock, buffer)
                warmed.wait()
                go.wait()
                for _ in range(requests):
                    buffer = exchange(sock, buffer)
                    done[index] += 1
        except Exception as error:  # reported below, the count tells the rest
            errors.append(f"connection {index}: {error}")
            warmed.abort()

    def spread(total, i):
        share, extra = divmod(total, connections)
        return share + (i < extra)

    threads = [threading.Thread(target=worker, args=(i, spread(warmup, i), spread(count, i)))
               for i in range(connections)]
    for thread in threads:
        thread.start()
    try:
        warmed.wait()
        print("READY", flush=True)
        sys.stdin.readline()
    except threading.BrokenBarrierError:
        pass
    go.set()
    for thread in threads:
        thread.join()
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    print(f"DONE {sum(done)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
