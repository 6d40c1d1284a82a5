# Builds both binaries once; compose runs `api` and `worker` from this image.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
# With the OTLP exporter: telemetry.otlp_endpoint turns it on.
RUN cargo build --release --locked --bins --features api/otlp,worker/otlp

FROM debian:bookworm-slim
# curl: the API's and the workers' container health checks.
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/api /src/target/release/worker /usr/local/bin/
USER nobody
CMD ["api", "serve"]
