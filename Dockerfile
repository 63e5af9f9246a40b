# The courier binary in a small image: built in a Rust image, run from a
# distroless one (glibc, no shell, non-root).
#   docker build -t courier .
#   docker run -p 7700:7700 -p 7780:7780 -v $PWD/courier.toml:/etc/courier/courier.toml:ro courier
FROM rust:1.89-slim-bookworm AS build
# ring and jemalloc build from C; jemalloc's build runs make.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p courier-cli \
    && cp target/release/courier /courier

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /courier /usr/local/bin/courier
EXPOSE 7700 7780
VOLUME ["/data"]
ENTRYPOINT ["/usr/local/bin/courier"]
# Listening beyond loopback needs a manifest: mount yours at this path.
CMD ["serve", "--listen", "0.0.0.0:7700", "--http", "0.0.0.0:7780", "--data-dir", "/data", "--manifest", "/etc/courier/courier.toml"]
