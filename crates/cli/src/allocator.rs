//! The process's allocator: jemalloc.
//!
//! Measured with `courier bench` on 2 cores against glibc's malloc (whose
//! functions were ~8% of the broker's CPU in a transient publish: small
//! messages allocated on one thread and freed on another): W1b +24%,
//! W3a +11%, W4b +24%, W4a p50 −7%, with the broker's RSS per waiting
//! message unchanged (`an_offline_backlog_lives_on_disk_not_in_broker_memory`).
//! mimalloc was faster still, but held about twice the memory per waiting
//! message at 100,000 (less without transparent huge pages, but then no
//! faster than jemalloc), and giving it back on a timer multiplied W4's
//! p99 latency by more than ten.
//!
//! jemalloc is built with `dirty_decay_ms:1000` (`.cargo/config.toml`): freed
//! pages go back to the OS after about a second instead of ten, so the
//! broker's RSS falls back after a burst (W7b: 29.9–41.5 → 28.0–29.1 MiB just
//! after a 1 GiB backlog; W1a unchanged).

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
