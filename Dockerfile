# koodrive-gateway container image.
#
#   docker build -t koodrive-gateway .
#
# Demo (the image's default command: HTTPS on 8443, admin on 9091, both on
# every interface; dev certificates and JWT key created on start under
# /var/lib/koodrive-gateway/dev, inside the container, never in the image):
#   docker run --rm -p 8443:8443 -p 9091:9091 koodrive-gateway
#
# Production: mount your config directory and certificates read-only over
# the demo's, give the client secret as an environment variable:
#   docker run --read-only -p 8443:8443 -p 9091:9091 \
#     -v "$PWD/my-config:/etc/koodrive-gateway/config:ro" \
#     -v "$PWD/my-tls:/etc/koodrive-gateway/tls:ro" \
#     -e KOODRIVE_CLIENT_SECRET koodrive-gateway
# (my-config/gateway.toml; its tls_cert/tls_key under /etc/koodrive-gateway/tls.)
#
# Layout: the binary in /usr/local/bin; the config read from
# /etc/koodrive-gateway/config/gateway.toml (the demo, config/container.toml,
# until a mount replaces it); every shipped example under
# /usr/share/koodrive-gateway/examples (no mount hides them); the only
# directory the gateway's user (uid 10001) may write is its working
# directory /var/lib/koodrive-gateway. The final stage has no RUN: what it
# holds is exactly what its COPY lines say (.ci/image-layout.py rebuilds
# that layout around the binary and runs it).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml declares the micro-benchmark target: its file must exist.
COPY benches ./benches
RUN cargo build --release --locked --bin koodrive-gateway \
    && mkdir -p /layout/var/lib/koodrive-gateway

FROM debian:bookworm-slim
COPY --from=build /src/target/release/koodrive-gateway /usr/local/bin/koodrive-gateway
COPY config /usr/share/koodrive-gateway/examples
COPY config/container.toml /etc/koodrive-gateway/config/gateway.toml
COPY --from=build --chown=10001:10001 /layout/var/lib/koodrive-gateway /var/lib/koodrive-gateway
WORKDIR /var/lib/koodrive-gateway
USER 10001:10001
# 8443: the gateway (server.listen); 9091: /healthz, /readyz, /metrics
# (server.admin_listen).
EXPOSE 8443 9091
# The slim base has no curl: the binary asks the admin listener the config
# names (server.admin_listen, loopback when it listens on every address)
# for /healthz. Kubernetes ignores HEALTHCHECK: the manifests in
# deploy/kubernetes/ use httpGet probes.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/koodrive-gateway", "health", "--config", "/etc/koodrive-gateway/config/gateway.toml"]
ENTRYPOINT ["/usr/local/bin/koodrive-gateway"]
CMD ["serve", "--config", "/etc/koodrive-gateway/config/gateway.toml"]
