# Builds both binaries once; compose (and deploy/k8s) run `api` and `worker`
# from this image.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# The dependencies in a layer of their own, built against empty crates: it
# is rebuilt only when a manifest or Cargo.lock changes, not at every edit.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY api/Cargo.toml api/
COPY worker/Cargo.toml worker/
COPY shared/Cargo.toml shared/
COPY bench/Cargo.toml bench/
RUN for crate in api worker shared bench; do mkdir -p "$crate/src" && echo 'fn main() {}' >"$crate/src/main.rs"; done \
    && for crate in api worker shared; do touch "$crate/src/lib.rs"; done \
    && rm shared/src/main.rs \
    && cargo build --release --locked --bins --features api/otlp,worker/otlp \
    && rm -rf api/src worker/src shared/src bench/src
COPY . .
# Newer than the empty crates' build, whatever times the context kept.
RUN touch api/src/* worker/src/* shared/src/* bench/src/* \
    && cargo build --release --locked --bins --features api/otlp,worker/otlp

FROM debian:bookworm-slim
# curl: the API's and the workers' health checks.
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/api /src/target/release/worker /usr/local/bin/
# Not root: the binaries need no privilege (ports above 1024, no files).
USER nobody
EXPOSE 8080 9090
# The API's readiness (the default command); compose and Kubernetes probe
# each service on its own port (a worker's is worker.http_port, 9090).
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD curl -fsS http://localhost:8080/readyz || exit 1
CMD ["api", "serve"]
