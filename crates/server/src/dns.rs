//! DNS for the service registry (`courier serve --dns ADDR`), over UDP and
//! TCP on the same port.
//!
//! The zone is `courier.`; `NAME.service.courier.` answers A (and AAAA)
//! with the addresses of NAME's healthy instances and SRV with their ports,
//! each SRV target (`HEX.addr.courier.`, the IP in hex, or the advertised
//! host name) resolved in the additional section. Names of no service are
//! NXDOMAIN; other record types at a name that exists are answered empty
//! (NOERROR); names outside the zone are REFUSED (this is no resolver);
//! other opcodes are NOTIMP. Every TTL is 0: a lookup is always current.
//!
//! Lookups never walk the registry per query: each service's answer is
//! built once per registry change, under the broker's lock for the time it
//! takes to copy that service's instances, and then served from a cache
//! keyed by the registry's change index.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use courier_broker::registry::Registry;
use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tracing::{debug, warn};

use crate::Shared;

/// Largest UDP answer to a query without EDNS (RFC 1035).
const UDP_PLAIN_MAX: usize = 512;
/// Largest UDP answer we send with EDNS, whatever the query offers: the
/// size recommended to stay clear of fragmentation (DNS flag day 2020).
const UDP_EDNS_MAX: u16 = 1232;
/// A TCP connection idle this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// TCP connections served at once; more are closed at accept.
const TCP_CONNECTIONS_MAX: usize = 256;
/// Cached services (negative answers included) before the cache starts over.
const CACHE_MAX: usize = 4096;
/// Tasks reading the UDP socket.
const UDP_WORKERS: usize = 2;

/// What DNS says about one service: whether it exists at all, and where
/// its healthy instances serve.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServiceAnswer {
    pub exists: bool,
    /// `(host, port)` of each healthy instance that advertises an address.
    pub endpoints: Vec<(String, u16)>,
}

impl ServiceAnswer {
    /// Copies what DNS needs of `service` out of the registry. A service
    /// name is matched without regard to case, as DNS names are.
    pub fn of(registry: &Registry, service: &str) -> ServiceAnswer {
        let mut instances = registry.instances(service, true);
        if instances.is_empty() {
            if let Some(name) = registry
                .service_names()
                .into_iter()
                .find(|n| n.eq_ignore_ascii_case(service))
            {
                instances = registry.instances(&name, true);
            }
        }
        let endpoints = instances
            .iter()
            .filter(|i| i.health.is_healthy())
            .filter_map(|i| {
                let (host, port) = i.spec.address.rsplit_once(':')?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                Some((host.to_string(), port.parse().ok()?))
            })
            .collect();
        ServiceAnswer {
            exists: !instances.is_empty(),
            endpoints,
        }
    }
}

/// Answers per service, valid while the registry's index is the one they
/// were built at.
#[derive(Default)]
pub(crate) struct DnsCache {
    services: RwLock<HashMap<String, (u64, Arc<ServiceAnswer>)>>,
}

impl DnsCache {
    fn lookup(&self, shared: &Shared, service: &str) -> Arc<ServiceAnswer> {
        let current = shared.registry.current_index();
        let key = service.to_ascii_lowercase();
        {
            let services = self.services.read().unwrap_or_else(|p| p.into_inner());
            if let Some((index, answer)) = services.get(&key) {
                if *index == current {
                    return answer.clone();
                }
            }
        }
        let (index, answer) = {
            let core = shared.core();
            let registry = core.registry();
            (registry.index(), ServiceAnswer::of(registry, service))
        };
        let answer = Arc::new(answer);
        let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
        if services.len() >= CACHE_MAX {
            services.clear();
        }
        services.insert(key, (index, answer.clone()));
        answer
    }
}

/// The UDP socket and TCP listener of `--dns`, on one port.
pub(crate) struct DnsListener {
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
}

impl DnsListener {
    /// Binds UDP first, then TCP on the port UDP got (which matters with
    /// port 0).
    pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<DnsListener> {
        let mut last_error = None;
        for _ in 0..8 {
            let udp = UdpSocket::bind(addr).await?;
            let bound = udp.local_addr()?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => {
                    return Ok(DnsListener {
                        udp: Arc::new(udp),
                        tcp,
                    })
                }
                // Port 0 gave a UDP port whose TCP twin is taken: try another.
                Err(e) if addr.port() == 0 => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("no free port")))
    }

    pub(crate) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    pub(crate) async fn serve(self, shared: Arc<Shared>) {
        let cache = Arc::new(DnsCache::default());
        let mut workers = Vec::new();
        for _ in 0..UDP_WORKERS {
            workers.push(crate::AbortOnDrop(tokio::spawn(serve_udp(
                self.udp.clone(),
                shared.clone(),
                cache.clone(),
            ))));
        }
        let open = Arc::new(AtomicUsize::new(0));
        loop {
            let (stream, peer) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "DNS: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if open.fetch_add(1, Ordering::Relaxed) >= TCP_CONNECTIONS_MAX {
                open.fetch_sub(1, Ordering::Relaxed);
                debug!(%peer, "DNS: too many TCP connections; closed");
                continue;
            }
            let (shared, cache, open) = (shared.clone(), cache.clone(), open.clone());
            tokio::spawn(async move {
                serve_tcp(stream, &shared, &cache).await;
                open.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>, cache: Arc<DnsCache>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                // ICMP errors of earlier answers surface here on Linux.
                debug!(error = %e, "DNS: UDP receive failed");
                continue;
            }
        };
        let lookup = |service: &str| cache.lookup(&shared, service);
        if let Some(answer) = answer(&buf[..len], Transport::Udp, lookup) {
            if let Err(e) = socket.send_to(&answer, peer).await {
                debug!(error = %e, %peer, "DNS: UDP send failed");
            }
        }
    }
}

async fn serve_tcp(mut stream: TcpStream, shared: &Shared, cache: &DnsCache) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        buf.resize(usize::from(u16::from_be_bytes(len)), 0);
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let lookup = |service: &str| cache.lookup(shared, service);
        let Some(answer) = answer(&buf, Transport::Tcp, lookup) else {
            return;
        };
        let Ok(answer_len) = u16::try_from(answer.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(2 + answer.len());
        framed.extend_from_slice(&answer_len.to_be_bytes());
        framed.extend_from_slice(&answer);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Where a query's name falls in the zone.
enum Target {
    /// `courier.` or `service.courier.`: names that exist and hold nothing.
    Empty,
    Service(String),
    Addr(IpAddr),
    /// Inside the zone, but nothing is there.
    Nowhere,
    /// Outside the zone.
    Foreign,
}

fn classify(name: &Name) -> Target {
    let labels: Vec<&[u8]> = name.iter().collect();
    let lower = |l: &[u8]| String::from_utf8_lossy(l).to_ascii_lowercase();
    match labels.as_slice() {
        [zone, ..] if labels.len() == 1 && lower(zone) == "courier" => Target::Empty,
        [.., zone] if lower(zone) != "courier" => Target::Foreign,
        [] => Target::Foreign,
        [kind, _] if lower(kind) == "service" || lower(kind) == "addr" => Target::Empty,
        [service, kind, _] if lower(kind) == "service" => {
            Target::Service(String::from_utf8_lossy(service).into_owned())
        }
        [hex, kind, _] if lower(kind) == "addr" => {
            parse_addr_label(&lower(hex)).map_or(Target::Nowhere, Target::Addr)
        }
        _ => Target::Nowhere,
    }
}

/// `7f000001` → 127.0.0.1; 32 hex digits → an IPv6 address.
fn parse_addr_label(hex: &str) -> Option<IpAddr> {
    match hex.len() {
        8 => u32::from_str_radix(hex, 16)
            .ok()
            .map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        32 => u128::from_str_radix(hex, 16)
            .ok()
            .map(|v| IpAddr::V6(Ipv6Addr::from(v))),
        _ => None,
    }
}

fn addr_name(ip: IpAddr) -> Option<Name> {
    let hex = match ip {
        IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
    };
    Name::from_ascii(format!("{hex}.addr.courier.")).ok()
}

fn zone_soa(serial: u32) -> Option<Record> {
    let zone = Name::from_ascii("courier.").ok()?;
    let soa = SOA::new(
        Name::from_ascii("ns.courier.").ok()?,
        Name::from_ascii("hostmaster.courier.").ok()?,
        serial,
        3600,
        600,
        86400,
        0,
    );
    Some(Record::from_rdata(zone, 0, RData::SOA(soa)))
}

fn ip_record(name: &Name, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), 0, rdata)
}

fn wants(query_type: RecordType, ip: IpAddr) -> bool {
    matches!(
        (query_type, ip),
        (RecordType::A, IpAddr::V4(_)) | (RecordType::AAAA, IpAddr::V6(_))
    )
}

/// The answer to one DNS message, encoded; `None` when nothing should be
/// sent (a response, or bytes too short to hold a message id).
pub fn answer(
    request: &[u8],
    transport: Transport,
    mut lookup: impl FnMut(&str) -> Arc<ServiceAnswer>,
) -> Option<Vec<u8>> {
    let request = match Message::from_vec(request) {
        Ok(message) => message,
        Err(_) => {
            let id = u16::from_be_bytes([*request.first()?, *request.get(1)?]);
            let is_query = request.get(2).is_some_and(|flags| flags & 0x80 == 0);
            if !is_query {
                return None;
            }
            let error = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            return error.to_vec().ok();
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata = Metadata::response_from_request(&request.metadata);
    response.metadata.message_type = MessageType::Response;
    response.metadata.authoritative = true;
    response.metadata.recursion_available = false;
    response.metadata.authentic_data = false;
    let udp_max = match &request.edns {
        Some(edns) => usize::from(edns.max_payload().clamp(512, UDP_EDNS_MAX)),
        None => UDP_PLAIN_MAX,
    };
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_EDNS_MAX);
        response.set_edns(edns);
    }
    response.add_queries(request.queries.iter().cloned());
    if request.metadata.op_code != OpCode::Query {
        response.metadata.response_code = ResponseCode::NotImp;
        return response.to_vec().ok();
    }
    let [query] = request.queries.as_slice() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response.to_vec().ok();
    };
    if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
        response.metadata.response_code = ResponseCode::Refused;
        return response.to_vec().ok();
    }
    let name = query.name();
    let query_type = query.query_type();
    let mut serial = 0;
    match classify(name) {
        Target::Foreign => {
            response.metadata.authoritative = false;
            response.metadata.response_code = ResponseCode::Refused;
            return response.to_vec().ok();
        }
        Target::Nowhere => response.metadata.response_code = ResponseCode::NXDomain,
        Target::Empty => {}
        Target::Addr(ip) => {
            if wants(query_type, ip) {
                response.add_answer(ip_record(name, ip));
            }
        }
        Target::Service(service) => {
            let found = lookup(&service);
            serial = found.endpoints.len() as u32;
            if !found.exists {
                response.metadata.response_code = ResponseCode::NXDomain;
            }
            service_records(&mut response, name, query_type, &found);
        }
    }
    if response.answers.is_empty() {
        // Negative answers carry the zone's SOA (RFC 2308); its minimum of
        // 0 says not to cache them either.
        if let Some(soa) = zone_soa(serial) {
            response.add_authority(soa);
        }
    }
    let encoded = response.to_vec().ok()?;
    if transport == Transport::Tcp || encoded.len() <= udp_max {
        return Some(encoded);
    }
    // Too long for UDP: first without the additional records (a resolver
    // looks them up itself), else truncated so the client asks over TCP.
    response.additionals.clear();
    let encoded = response.to_vec().ok()?;
    if encoded.len() <= udp_max {
        return Some(encoded);
    }
    response.truncate().to_vec().ok()
}

fn service_records(
    response: &mut Message,
    name: &Name,
    query_type: RecordType,
    found: &ServiceAnswer,
) {
    let mut seen_ips = Vec::new();
    match query_type {
        RecordType::A | RecordType::AAAA => {
            for (host, _) in &found.endpoints {
                let Ok(ip) = host.parse::<IpAddr>() else {
                    continue;
                };
                if wants(query_type, ip) && !seen_ips.contains(&ip) {
                    seen_ips.push(ip);
                    response.add_answer(ip_record(name, ip));
                }
            }
        }
        RecordType::SRV => {
            let mut additional = Vec::new();
            for (host, port) in &found.endpoints {
                let target = match host.parse::<IpAddr>() {
                    Ok(ip) => {
                        let Some(target) = addr_name(ip) else {
                            continue;
                        };
                        if !seen_ips.contains(&ip) {
                            seen_ips.push(ip);
                            additional.push(ip_record(&target, ip));
                        }
                        target
                    }
                    Err(_) => match Name::from_ascii(format!("{host}.")) {
                        Ok(target) => target,
                        Err(_) => continue,
                    },
                };
                let srv = SRV::new(1, 1, *port, target);
                response.add_answer(Record::from_rdata(name.clone(), 0, RData::SRV(srv)));
            }
            response.add_additionals(additional);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn query(name: &str, query_type: RecordType) -> Vec<u8> {
        let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            query_type,
        ));
        m.to_vec().expect("encode")
    }

    fn todo(endpoints: &[(&str, u16)]) -> Arc<ServiceAnswer> {
        Arc::new(ServiceAnswer {
            exists: true,
            endpoints: endpoints.iter().map(|(h, p)| (h.to_string(), *p)).collect(),
        })
    }

    fn ask(name: &str, query_type: RecordType, transport: Transport) -> Message {
        let answer = answer(&query(name, query_type), transport, |service| {
            if service.eq_ignore_ascii_case("todo") {
                todo(&[("127.0.0.1", 4001), ("127.0.0.1", 4002), ("::1", 4003)])
            } else if service == "idle" {
                todo(&[])
            } else {
                Arc::new(ServiceAnswer::default())
            }
        })
        .expect("an answer");
        let m = Message::from_vec(&answer).expect("decodes");
        assert_eq!(m.metadata.id, 4242);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        m
    }

    #[test]
    fn srv_lists_each_instance_with_its_port_and_the_targets_addresses() {
        let m = ask("todo.service.courier.", RecordType::SRV, Transport::Udp);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        let srv: Vec<(u16, String)> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((s.port, s.target.to_ascii())),
                _ => None,
            })
            .collect();
        assert_eq!(
            srv,
            vec![
                (4001, "7f000001.addr.courier.".to_string()),
                (4002, "7f000001.addr.courier.".to_string()),
                (
                    4003,
                    "00000000000000000000000000000001.addr.courier.".to_string()
                ),
            ]
        );
        assert!(m.answers.iter().all(|r| r.ttl == 0));
        assert_eq!(m.additionals.len(), 2, "one address record per target");
    }

    #[test]
    fn a_and_aaaa_list_each_address_once_and_names_are_case_blind() {
        let m = ask("TODO.Service.Courier.", RecordType::A, Transport::Udp);
        let ips: Vec<RData> = m.answers.iter().map(|r| r.data.clone()).collect();
        assert_eq!(ips, vec![RData::A(A(Ipv4Addr::LOCALHOST))]);
        let m = ask("todo.service.courier.", RecordType::AAAA, Transport::Udp);
        assert_eq!(m.answers.len(), 1);
        let m = ask("7f000001.addr.courier.", RecordType::A, Transport::Udp);
        assert_eq!(m.answers[0].data, RData::A(A(Ipv4Addr::LOCALHOST)));
    }

    #[test]
    fn unknown_names_are_nxdomain_and_other_types_are_answered_empty() {
        let m = ask("nope.service.courier.", RecordType::SRV, Transport::Udp);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.answers.is_empty());
        assert!(matches!(m.authorities[0].data, RData::SOA(_)));
        let m = ask("a.b.todo.service.courier.", RecordType::A, Transport::Udp);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        for (name, t) in [
            ("todo.service.courier.", RecordType::MX),
            ("todo.service.courier.", RecordType::TXT),
            ("idle.service.courier.", RecordType::SRV),
            ("service.courier.", RecordType::A),
        ] {
            let m = ask(name, t, Transport::Udp);
            assert_eq!(
                m.metadata.response_code,
                ResponseCode::NoError,
                "{name} {t}"
            );
            assert!(m.answers.is_empty(), "{name} {t}");
        }
        let m = ask("example.com.", RecordType::A, Transport::Udp);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn other_opcodes_are_not_implemented_and_garbage_is_a_format_error() {
        let mut m = Message::new(7, MessageType::Query, OpCode::Status);
        m.add_query(Query::query(
            Name::from_ascii("todo.service.courier.").expect("name"),
            RecordType::A,
        ));
        let bytes = answer(&m.to_vec().expect("encode"), Transport::Udp, |_| {
            Arc::new(ServiceAnswer::default())
        })
        .expect("answer");
        let m = Message::from_vec(&bytes).expect("decodes");
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);

        let bytes = answer(&[0, 9, 1, 0, 0, 1, 0xff], Transport::Udp, |_| {
            Arc::new(ServiceAnswer::default())
        })
        .expect("answer");
        let m = Message::from_vec(&bytes).expect("decodes");
        assert_eq!(m.metadata.id, 9);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert!(answer(&[1], Transport::Udp, |_| Arc::new(ServiceAnswer::default())).is_none());
    }

    #[test]
    fn an_answer_too_long_for_udp_is_truncated_and_whole_over_tcp() {
        let many: Vec<(String, u16)> = (0..100).map(|i| (format!("10.0.0.{i}"), 80)).collect();
        let lookup = |_: &str| {
            Arc::new(ServiceAnswer {
                exists: true,
                endpoints: many.clone(),
            })
        };
        let request = query("big.service.courier.", RecordType::SRV);
        let udp = answer(&request, Transport::Udp, lookup).expect("answer");
        assert!(udp.len() <= UDP_PLAIN_MAX);
        let m = Message::from_vec(&udp).expect("decodes");
        assert!(m.metadata.truncation);
        let tcp = answer(&request, Transport::Tcp, lookup).expect("answer");
        let m = Message::from_vec(&tcp).expect("decodes");
        assert_eq!(m.answers.len(), 100);
        assert!(!m.metadata.truncation);
    }

    #[test]
    fn only_healthy_instances_with_an_address_are_answered() {
        use courier_broker::registry::{Check, InstanceSpec, RegistryAction};
        let mut registry = Registry::default();
        let mut out: Vec<RegistryAction> = Vec::new();
        let spec = |id: &str, address: &str, check: Check| InstanceSpec {
            service: "todo".into(),
            id: id.into(),
            address: address.into(),
            meta: Default::default(),
            check,
            interval_ms: 1000,
            flap_threshold: 1,
            deregister_after_ms: 0,
            on_bus: false,
        };
        registry
            .register(spec("a", "127.0.0.1:1", Check::None), 0, &mut out)
            .expect("registers");
        registry
            .register(spec("b", "", Check::None), 0, &mut out)
            .expect("registers");
        let http = Check::Http {
            url: "http://127.0.0.1:2/".into(),
            timeout_ms: 10,
        };
        registry
            .register(spec("c", "127.0.0.1:2", http), 0, &mut out)
            .expect("registers");
        let found = ServiceAnswer::of(&registry, "Todo");
        assert!(found.exists);
        assert_eq!(found.endpoints, vec![("127.0.0.1".to_string(), 1)]);
        assert!(!ServiceAnswer::of(&registry, "db").exists);
    }
}
