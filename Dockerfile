# Multi-stage build of both binaries; the runtime image has only them and libssl.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p driftline-collector -p driftline-agent \
    && strip target/release/driftline-collector target/release/driftline-agent \
       target/release/driftline-agent-simulate

# docker-compose.yml's `secrets` service: openssl and mosquitto_passwd for
# deploy/mosquitto/secrets.sh.
FROM debian:bookworm-slim AS secrets
RUN apt-get update && apt-get install -y --no-install-recommends openssl mosquitto \
    && rm -rf /var/lib/apt/lists/*

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libssl3 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 driftline \
    && install -d -o driftline /var/lib/driftline-agent
# The agent's state (privacy budget ledger, sequence number, buffer) must
# outlive the container: a fresh one would be a fresh budget.
VOLUME /var/lib/driftline-agent
COPY --from=build /src/target/release/driftline-collector /src/target/release/driftline-agent \
     /src/target/release/driftline-agent-simulate /usr/local/bin/
USER driftline
WORKDIR /data
ENTRYPOINT ["driftline-collector"]
