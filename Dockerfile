# The courier image: the broker and the CLI, nothing else (distroless, no
# shell). Built from this repository:
#
#   docker build -t courier .
#   docker run -p 7700:7700 -p 7780:7780 -v "$PWD/courier.toml:/etc/courier/courier.toml:ro" courier
#
# `courier up --print-compose` writes a compose file that runs it.

FROM rust:1.89-bookworm AS build
WORKDIR /src
# ring and the jemalloc allocator build from C: the image has cc and make.
COPY . .
RUN cargo build --release --locked -p courier-cli --bin courier \
    && strip target/release/courier \
    && mkdir -p /out/data \
    && cp target/release/courier /out/courier

# glibc and libgcc only: what the binary links against.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/courier /usr/local/bin/courier
COPY --from=build --chown=65532:65532 /out/data /data
USER 65532:65532
EXPOSE 7700 7780
VOLUME ["/data"]
ENTRYPOINT ["/usr/local/bin/courier"]
# Listening beyond loopback needs a manifest (or --insecure): mount one.
CMD ["serve", "--listen", "0.0.0.0:7700", "--http", "0.0.0.0:7780", "--manifest", "/etc/courier/courier.toml", "--data-dir", "/data"]
