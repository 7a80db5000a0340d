# syntax=docker/dockerfile:1
#
# keel's container image: a static (musl) release binary on distroless/static.
#
# Size estimate, uncompressed:
#   gcr.io/distroless/static-debian12:nonroot   ~2 MB  (CA certificates, tzdata,
#                                                       /etc/passwd with the
#                                                       nonroot user; no libc,
#                                                       no shell)
#   config/                                     <0.1 MB
#   keel binary (stripped, thin LTO)            ~8 MB
# binary: 8.0 MB measured for the glibc release build; musl is about the same
#   total: about 10 MB, a third of the 30 MB target.
#
# Why not gcr.io/distroless/cc-debian12: it is static-debian12 plus glibc,
# libgcc_s, libstdc++ and OpenSSL, about 23 MB uncompressed. That is the
# figure used here, the commonly published size of that image (not measured
# on this machine, which has no Docker engine). With a binary of about 10 MB
# it comes to ~33 MB, over the 30 MB target, and keel needs none of those
# libraries: no OpenSSL (no TLS in-process), no C++; its only C dependency
# would be libc. So the binary is linked statically against musl and the
# base is the ~2 MB static image, which cuts the image to roughly a third.
# Trade-off: musl's malloc is slower than glibc's under many threads; if
# load tests show it, link a Rust allocator such as mimalloc (a Cargo.toml
# change) rather than going back to the larger base.
#
# Platforms: linux/amd64 and linux/arm64, from BuildKit's TARGETARCH (the
# musl target follows it). Each platform builds natively in its own
# container (QEMU under buildx on a foreign host), because ring and other
# C code need the musl C toolchain of the target itself:
#
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     --build-arg KEEL_VERSION=0.1.0 \
#     --build-arg KEEL_GIT_COMMIT="$(git rev-parse HEAD)" \
#     --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" -t keel:0.1.0 .
#
# Reproducible bases: each FROM takes its image reference from a build arg.
# Renovate (renovate.json) pins them as tag@sha256:digest and keeps them
# current; until then, or to pin by hand, pass the digest:
#   --build-arg RUST_IMAGE=docker.io/library/rust:1.95.0-slim-bookworm@sha256:...
#
# Layers: cargo-chef builds the dependencies from a recipe of the manifests
# (planner, then the cook step in builder), so that a change to src/ or
# proto/ rebuilds only keel itself. protox compiles proto/ in build.rs: no
# protoc is needed. The commit and version args are declared after the cook
# step, so a new commit does not rebuild the dependencies.
#
#   docker build -t keel:dev .
#   docker run --rm -p 9000:9000 -p 8080:8080 -p 8081:8081 \
#     -e KEEL__AUTH__DISABLED=true keel:dev

# Base images (tag, or tag@sha256:digest); see renovate.json.
ARG RUST_IMAGE=docker.io/library/rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot

FROM ${RUST_IMAGE} AS chef
ARG CARGO_CHEF_VERSION=0.1.76
# Set by BuildKit from --platform; a plain build uses the host's.
ARG TARGETARCH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# musl-tools: the musl C toolchain, for crates that compile C with cc (ring,
# through rustls, for TLS to the database and to clients). Not pinned to a
# Debian revision: the base image pins the release, and an exact revision
# breaks at Debian's next point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
# /rust-target: the musl target of TARGETARCH, for the cargo steps below.
RUN arch="${TARGETARCH:-$(dpkg --print-architecture)}" \
 && case "${arch}" in \
      amd64) echo x86_64-unknown-linux-musl ;; \
      arm64) echo aarch64-unknown-linux-musl ;; \
      *) echo "unsupported TARGETARCH ${arch}: use linux/amd64 or linux/arm64" >&2; exit 1 ;; \
    esac > /rust-target \
 && rustup target add "$(cat /rust-target)" \
 && cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /build

# The recipe: Cargo.toml, Cargo.lock and the list of targets. It changes only
# when the dependencies or the targets do.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /build/recipe.json recipe.json
# Every dependency, build-dependencies (protox, tonic-prost-build) included:
# this layer is reused as long as recipe.json is unchanged.
RUN cargo chef cook --release --locked --target "$(cat /rust-target)" --recipe-path recipe.json
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY benches ./benches
COPY src ./src
# keel_build_info{version, commit} (src/metrics; build.rs tracks both).
ARG KEEL_VERSION=""
ARG KEEL_GIT_COMMIT=unknown
RUN if [ -z "${KEEL_VERSION}" ]; then unset KEEL_VERSION; fi \
 && KEEL_GIT_COMMIT="${KEEL_GIT_COMMIT}" cargo build --release --locked --target "$(cat /rust-target)" --bin keel \
 && cp "target/$(cat /rust-target)/release/keel" /build/keel

FROM ${RUNTIME_IMAGE} AS runtime
ARG RUNTIME_IMAGE
ARG KEEL_VERSION=""
ARG KEEL_GIT_COMMIT=unknown
ARG BUILD_DATE=""
ARG SOURCE_URL=https://github.com/example/keel
# The OCI annotations (image-spec annotations.md). created, revision and
# version come from the build args above; pass them in CI.
LABEL org.opencontainers.image.title="keel" \
      org.opencontainers.image.description="A gRPC microservice with an HTTP/JSON gateway" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="keel" \
      org.opencontainers.image.authors="keel maintainers" \
      org.opencontainers.image.url="${SOURCE_URL}" \
      org.opencontainers.image.documentation="${SOURCE_URL}#readme" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.version="${KEEL_VERSION}" \
      org.opencontainers.image.revision="${KEEL_GIT_COMMIT}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.ref.name="${KEEL_VERSION}" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}"
WORKDIR /app
# keel reads config/default.yaml and config/$KEEL_ENV.yaml from here; a
# --config FILE (the Helm chart mounts /etc/keel/config.yaml) and KEEL__*
# variables are layered on top.
ENV KEEL_CONFIG_DIR=/app/config
# Safe by default wherever the image runs (Compose, another chart, kubectl
# run): the production overlay binds 0.0.0.0 (the built-in defaults bind
# loopback, unreachable through `docker run -p`) and keel refuses to start
# without bearer tokens (auth.tokens or auth.tokens_file) unless
# auth.disabled is set explicitly.
ENV KEEL_ENV=production
COPY config/ /app/config/
COPY --from=builder /build/keel /app/keel
# The distroless "nonroot" user and group.
USER 65532:65532
# gRPC, HTTP/JSON gateway, admin (/livez, /readyz, /metrics).
EXPOSE 9000 8080 8081
# The binary is its own health check client (grpc.health.v1 over gRPC on the
# configured grpc.addr); there is no shell or curl in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["/app/keel", "healthcheck"]
ENTRYPOINT ["/app/keel"]
CMD ["serve"]
