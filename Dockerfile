# Build: docker build -t koodrive-gateway .
# Run:   docker run -p 8443:8443 -v /etc/koodrive-gateway:/etc/koodrive-gateway \
#          koodrive-gateway serve --config /etc/koodrive-gateway/gateway.toml
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home /nonexistent gateway
COPY --from=build /src/target/release/koodrive-gateway /usr/local/bin/koodrive-gateway
COPY config /etc/koodrive-gateway/examples
USER gateway
EXPOSE 8443
ENTRYPOINT ["koodrive-gateway"]
CMD ["serve", "--config", "/etc/koodrive-gateway/gateway.toml"]
