# Both binaries in one small image: tunnel-server for the cloud side (deploy/kubernetes), and
# tunnel-edge for nodes that run it as a container rather than with deploy/edge/install.sh.
# Build: docker build -t tether .   Run: docker run tether run --config /etc/tether/server.toml
# (a test checks the COPY sources exist and the ENTRYPOINT is a binary the workspace builds).

# Toolchain at the workspace's rust-version (Cargo.toml), on the runtime's Debian release.
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY protocol protocol
COPY io io
COPY tunnel-server tunnel-server
COPY tunnel-edge tunnel-edge
COPY loadtest loadtest
COPY tests tests
RUN cargo build --release --locked -p tunnel-server -p tunnel-edge

# glibc, CA roots and nothing else; uid 65532 is distroless's "nonroot".
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tunnel-server /usr/local/bin/tunnel-server
COPY --from=build /src/target/release/tunnel-edge /usr/local/bin/tunnel-edge
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tunnel-server"]
