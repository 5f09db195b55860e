//! The redirect records of a connection, typed.

use std::net::SocketAddr;
use std::time::Duration;

use connredir_abi::{
    connredir_default_context, connredir_endpoint, connredir_hop, connredir_record, AF_INET,
    AF_INET6, CONNREDIR_MAX_HOPS, CONNREDIR_RECORD_MAGIC, CONNREDIR_RECORD_VERSION,
};

use crate::Error;

/// Identifies a registered redirect service (what a hop records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(pub u32);

impl std::fmt::Display for ServiceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "service {}", self.0)
    }
}

/// The state of a connection as one service sees it (WFP's
/// `FWPS_CONNECTION_REDIRECT_STATE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectState {
    /// No service redirected the connection.
    NotRedirected,
    /// The service redirected it last: it is the one handling it now.
    RedirectedBySelf,
    /// Other services redirected it; this one never did.
    RedirectedByOther,
    /// The service redirected it earlier, and another service since.
    PreviouslyRedirectedBySelf,
}

/// The redirect state of `records` for `service`; `None` means no records.
pub fn redirect_state(records: Option<&RedirectRecords>, service: ServiceId) -> RedirectState {
    records.map_or(RedirectState::NotRedirected, |r| r.state_for(service))
}

/// Who opened the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Process id (thread group id).
    pub pid: u32,
    /// User id.
    pub uid: u32,
    /// cgroup v2 id.
    pub cgroup_id: u64,
}

/// One redirect in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// The service that took the connection.
    pub service: ServiceId,
    /// Where the connection was going before this redirect (`0.0.0.0:0` in
    /// the unlikely case the layer could not record it).
    pub original_destination: SocketAddr,
    /// The redirected socket's own address, when known.
    pub local: Option<SocketAddr>,
    /// When it happened: time since boot (`CLOCK_BOOTTIME`), zero in
    /// records built by hand.
    pub since_boot: Duration,
}

/// ABI structs that are read from and viewed as bytes.
///
/// # Safety
///
/// Only for `#[repr(C)]` structs made of integers and integer arrays with
/// no implicit padding: every byte is initialized, and any byte pattern is
/// a valid value.
pub(crate) unsafe trait PlainData: Copy {}

// SAFETY: bindgen-generated from uapi.h: integers, integer arrays and
// endpoints (integers), every field at its natural offset with no gap
// (header 32 bytes, 8 hops of 64, comm 16, seal 8).
unsafe impl PlainData for connredir_record {}
// SAFETY: bindgen-generated from uapi.h: two endpoints of integers
// (24 bytes each, no gap).
unsafe impl PlainData for connredir_default_context {}
// SAFETY: family, port, address and zero padding as explicit fields.
#[cfg(test)]
unsafe impl PlainData for libc::sockaddr_in {}
// SAFETY: family, port, flow info, address and scope id, no gap.
#[cfg(test)]
unsafe impl PlainData for libc::sockaddr_in6 {}

/// Reads a plain-data ABI struct from the front of `bytes` (zero-filled when
/// shorter; callers check the length they need).
fn read_plain<T: PlainData + Default>(bytes: &[u8]) -> T {
    let mut value = T::default();
    let n = bytes.len().min(std::mem::size_of::<T>());
    // SAFETY: T is PlainData: any byte pattern is a valid value; n bytes
    // fit in it.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut value as *mut T).cast(), n) };
    value
}

/// Views a plain-data ABI struct as its bytes.
pub(crate) fn plain_bytes<T: PlainData>(value: &T) -> &[u8] {
    // SAFETY: T is PlainData, so every byte is initialized; the slice
    // borrows `value`.
    unsafe { std::slice::from_raw_parts((value as *const T).cast(), std::mem::size_of::<T>()) }
}

/// The chain of services that redirected a connection, and who opened it.
/// To a proxy this is an opaque blob to carry from the accepted socket to the
/// onward one; the accessors are there for logging and policy.
///
/// The layer seals the records it hands out with a key only it holds; a
/// service's process may set only records the layer issued whose last hop is
/// its own service, exactly as read. Records built or changed here (`new`,
/// `push_hop`, `set_client`, ...) are unsealed: only root may set them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RedirectRecords {
    raw: connredir_record,
}

impl std::fmt::Debug for RedirectRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedirectRecords")
            .field("client", &self.client())
            .field("hops", &self.hops().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for RedirectRecords {
    fn default() -> Self {
        Self::new()
    }
}

impl RedirectRecords {
    /// Size of the blob this version writes.
    pub const SIZE: usize = std::mem::size_of::<connredir_record>();

    /// Size of a version 1 blob, the smallest a valid blob can have: the
    /// current layout up to the client's command, which version 2 added.
    pub const V1_SIZE: usize = std::mem::offset_of!(connredir_record, client_comm);

    /// Size of a version 2 blob: the current layout up to the seal, which
    /// version 3 added.
    pub const V2_SIZE: usize = std::mem::offset_of!(connredir_record, seal);

    /// Empty records (no hops), current version.
    pub fn new() -> RedirectRecords {
        RedirectRecords {
            raw: connredir_record {
                magic: CONNREDIR_RECORD_MAGIC,
                version: CONNREDIR_RECORD_VERSION as u16,
                size: Self::SIZE as u16,
                ..Default::default()
            },
        }
    }

    /// Parses a blob: checks the magic, the version (1 to the current one),
    /// the size field and the hop count. A longer blob from a newer minor
    /// version is read up to what this version knows; a version 1 blob reads
    /// as the current version without the client's command, a version 1 or
    /// 2 blob as an unsealed one. The seal is kept as it is, not checked
    /// (only the layer can).
    pub fn from_bytes(bytes: &[u8]) -> Result<RedirectRecords, Error> {
        let invalid = |why: String| Err(Error::InvalidArgument(why));
        if bytes.len() < Self::V1_SIZE {
            return invalid(format!(
                "records blob is {} bytes; a valid one has at least {}",
                bytes.len(),
                Self::V1_SIZE
            ));
        }
        let mut raw: connredir_record = read_plain(bytes);
        if raw.magic != CONNREDIR_RECORD_MAGIC {
            return invalid("records blob does not start with the connredir magic".into());
        }
        if raw.version == 0 || u32::from(raw.version) > CONNREDIR_RECORD_VERSION {
            return invalid(format!(
                "records version {} is not supported (this library reads 1 to {CONNREDIR_RECORD_VERSION})",
                raw.version
            ));
        }
        let least = match raw.version {
            1 => Self::V1_SIZE,
            2 => Self::V2_SIZE,
            _ => Self::SIZE,
        };
        if (raw.size as usize) < least || raw.size as usize > bytes.len() {
            return invalid(format!(
                "records size field says {} bytes, blob has {} (version {} has at least {least})",
                raw.size,
                bytes.len(),
                raw.version
            ));
        }
        if raw.version == 1 {
            // Whatever follows a version 1 blob is not a command.
            raw.client_comm = Default::default();
        }
        if raw.version <= 2 {
            // Nor is what follows a version 2 blob a seal.
            raw.seal = 0;
        }
        raw.version = CONNREDIR_RECORD_VERSION as u16;
        raw.size = Self::SIZE as u16;
        if u32::from(raw.hop_count) > CONNREDIR_MAX_HOPS {
            return invalid(format!(
                "records claim {} hops; at most {CONNREDIR_MAX_HOPS} exist",
                raw.hop_count
            ));
        }
        Ok(RedirectRecords { raw })
    }

    /// The blob, as `set_records_from` takes it.
    pub fn to_bytes(&self) -> Vec<u8> {
        plain_bytes(&self.raw).to_vec()
    }

    /// Number of redirects so far.
    pub fn hop_count(&self) -> usize {
        usize::from(self.raw.hop_count).min(CONNREDIR_MAX_HOPS as usize)
    }

    fn raw_hops(&self) -> &[connredir_hop] {
        &self.raw.hops[..self.hop_count()]
    }

    /// The hops, oldest first.
    pub fn hops(&self) -> impl Iterator<Item = Hop> + '_ {
        self.raw_hops().iter().map(|h| Hop {
            service: ServiceId(h.service_id),
            original_destination: h
                .original_dst
                .to_socket_addr()
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            local: h.local.to_socket_addr(),
            since_boot: Duration::from_nanos(h.time_ns),
        })
    }

    /// The services that redirected the connection, in order.
    pub fn chain(&self) -> Vec<ServiceId> {
        self.hops().map(|h| h.service).collect()
    }

    /// Where the connection was going when it was redirected to the current
    /// service (the last hop's destination): what a proxy connects to.
    pub fn original_destination(&self) -> Option<SocketAddr> {
        self.raw_hops()
            .last()
            .and_then(|h| h.original_dst.to_socket_addr())
    }

    /// Where the client first wanted to go (the first hop's destination).
    pub fn first_destination(&self) -> Option<SocketAddr> {
        self.raw_hops()
            .first()
            .and_then(|h| h.original_dst.to_socket_addr())
    }

    /// The process that opened the flow.
    pub fn client(&self) -> ClientIdentity {
        ClientIdentity {
            pid: self.raw.client_pid,
            uid: self.raw.client_uid,
            cgroup_id: self.raw.client_cgroup_id,
        }
    }

    /// The command name (comm) of the thread that opened the flow, as the
    /// layer saw it at connect time; `None` when unknown (version 1 records,
    /// or records built by hand).
    pub fn client_command(&self) -> Option<String> {
        let comm = &self.raw.client_comm;
        let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
        (len > 0).then(|| String::from_utf8_lossy(&comm[..len]).into_owned())
    }

    /// Sets the client's command name (for tools and tests that build records
    /// by hand); longer names are cut to the 15 bytes the kernel keeps.
    pub fn set_client_command(&mut self, command: &str) {
        self.raw.seal = 0;
        let comm = &mut self.raw.client_comm;
        *comm = Default::default();
        let bytes = command.as_bytes();
        let len = bytes.len().min(comm.len() - 1);
        comm[..len].copy_from_slice(&bytes[..len]);
    }

    /// The connection's state from `service`'s point of view.
    pub fn state_for(&self, service: ServiceId) -> RedirectState {
        let chain = self.chain();
        match chain.iter().rposition(|s| *s == service) {
            _ if chain.is_empty() => RedirectState::NotRedirected,
            Some(i) if i + 1 == chain.len() => RedirectState::RedirectedBySelf,
            Some(_) => RedirectState::PreviouslyRedirectedBySelf,
            None => RedirectState::RedirectedByOther,
        }
    }

    /// Sets who opened the flow (for tools and tests that build records by
    /// hand; the kernel fills it in from the connecting process).
    pub fn set_client(&mut self, client: ClientIdentity) {
        self.raw.seal = 0;
        self.raw.client_pid = client.pid;
        self.raw.client_uid = client.uid;
        self.raw.client_cgroup_id = client.cgroup_id;
    }

    /// Appends a hop (for tools and tests that build records by hand; the
    /// kernel appends hops itself). Fails when the chain is full.
    pub fn push_hop(
        &mut self,
        service: ServiceId,
        original_destination: SocketAddr,
    ) -> Result<(), Error> {
        let at = self.hop_count();
        if at >= CONNREDIR_MAX_HOPS as usize {
            return Err(Error::InvalidArgument(format!(
                "a chain holds at most {CONNREDIR_MAX_HOPS} hops"
            )));
        }
        self.raw.seal = 0;
        self.raw.hops[at] = connredir_hop {
            service_id: service.0,
            original_dst: connredir_endpoint::from_socket_addr(&original_destination),
            ..Default::default()
        };
        self.raw.hop_count += 1;
        Ok(())
    }
}

/// The redirect context: bytes the redirecting side chose for its service,
/// or by default the original destination and local address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectContext(pub Vec<u8>);

impl RedirectContext {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Decodes the default context: (original destination, original local
    /// address). `None` when the bytes are not a default context.
    pub fn original_addresses(&self) -> Option<(SocketAddr, Option<SocketAddr>)> {
        if self.0.len() != std::mem::size_of::<connredir_default_context>() {
            return None;
        }
        let ctx: connredir_default_context = read_plain(&self.0);
        // The local address may be unknown (family 0), never another family.
        if !matches!(ctx.local.family, 0 | AF_INET | AF_INET6) {
            return None;
        }
        Some((ctx.remote.to_socket_addr()?, ctx.local.to_socket_addr()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn three_hops() -> RedirectRecords {
        let mut r = RedirectRecords::new();
        for id in [1, 2, 3] {
            r.push_hop(ServiceId(id), addr("10.0.0.1:443")).unwrap();
        }
        r
    }

    #[test]
    fn round_trip() {
        let mut r = three_hops();
        r.set_client(ClientIdentity {
            pid: 42,
            uid: 1000,
            cgroup_id: 7,
        });
        r.push_hop(ServiceId(9), addr("[2001:db8::1]:80")).unwrap();
        let bytes = r.to_bytes();
        assert_eq!(bytes.len(), RedirectRecords::SIZE);
        let back = RedirectRecords::from_bytes(&bytes).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.hop_count(), 4);
        assert_eq!(back.client().pid, 42);
        assert_eq!(back.client().cgroup_id, 7);
        assert_eq!(
            back.chain(),
            [1, 2, 3, 9].map(ServiceId).to_vec(),
            "hops are kept oldest first"
        );
        let last = back.hops().last().unwrap();
        assert_eq!(last.local, None, "family 0 is an unknown local address");
        assert_eq!(last.since_boot, Duration::ZERO);
    }

    #[test]
    fn destinations_v4_and_v6() {
        let mut r = RedirectRecords::new();
        assert_eq!(r.original_destination(), None);
        assert_eq!(r.first_destination(), None);
        r.push_hop(ServiceId(1), addr("192.0.2.1:443")).unwrap();
        assert_eq!(r.original_destination(), Some(addr("192.0.2.1:443")));
        assert_eq!(r.first_destination(), Some(addr("192.0.2.1:443")));
        r.push_hop(ServiceId(2), addr("[2001:db8::2]:8443"))
            .unwrap();
        assert_eq!(r.original_destination(), Some(addr("[2001:db8::2]:8443")));
        assert_eq!(r.first_destination(), Some(addr("192.0.2.1:443")));

        let mut r = RedirectRecords::new();
        r.push_hop(ServiceId(1), addr("[2001:db8::1]:80")).unwrap();
        r.push_hop(ServiceId(2), addr("127.0.0.1:3128")).unwrap();
        assert_eq!(r.first_destination(), Some(addr("[2001:db8::1]:80")));
        assert_eq!(r.original_destination(), Some(addr("127.0.0.1:3128")));
    }

    #[test]
    fn rejects_bad_blobs() {
        let good = three_hops().to_bytes();
        let set = |at: usize, bytes: &[u8]| {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            RedirectRecords::from_bytes(&b)
        };
        let u16_at = |field: usize, v: u16| set(field, &v.to_ne_bytes());
        let version = offset_of!(connredir_record, version);
        let size = offset_of!(connredir_record, size);
        let hops = offset_of!(connredir_record, hop_count);
        let bad = [
            (
                "short blob",
                RedirectRecords::from_bytes(&good[..good.len() - 1]),
            ),
            ("empty blob", RedirectRecords::from_bytes(&[])),
            ("bad magic", set(0, b"XXXX")),
            ("version 0", u16_at(version, 0)),
            (
                "version too new",
                u16_at(version, CONNREDIR_RECORD_VERSION as u16 + 1),
            ),
            ("9 hops", u16_at(hops, 9)),
            ("size past the blob", u16_at(size, good.len() as u16 + 1)),
            ("size under v1", u16_at(size, 8)),
        ];
        for (what, result) in bad {
            assert!(
                matches!(result, Err(Error::InvalidArgument(_))),
                "{what}: {result:?}"
            );
        }
        // A longer blob (a newer minor version) is read up to what we know.
        let mut longer = good.clone();
        longer.extend_from_slice(&[0; 16]);
        let grown = (good.len() + 16) as u16;
        longer[size..size + 2].copy_from_slice(&grown.to_ne_bytes());
        assert_eq!(
            RedirectRecords::from_bytes(&longer).unwrap().chain(),
            three_hops().chain()
        );
    }

    #[test]
    fn version_1_blobs_read_without_a_command() {
        let mut r = three_hops();
        r.set_client_command("curl");
        assert_eq!(r.client_command().as_deref(), Some("curl"));
        let mut v1 = r.to_bytes();
        v1.truncate(RedirectRecords::V1_SIZE);
        let version = offset_of!(connredir_record, version);
        let size = offset_of!(connredir_record, size);
        v1[version..version + 2].copy_from_slice(&1u16.to_ne_bytes());
        v1[size..size + 2].copy_from_slice(&(RedirectRecords::V1_SIZE as u16).to_ne_bytes());
        let back = RedirectRecords::from_bytes(&v1).unwrap();
        assert_eq!(back.chain(), r.chain());
        assert_eq!(back.client_command(), None);
        assert_eq!(
            back.to_bytes().len(),
            RedirectRecords::SIZE,
            "written as the current version"
        );
        // A version 2 blob must be whole.
        let mut short = r.to_bytes();
        short.truncate(RedirectRecords::V1_SIZE);
        short[size..size + 2].copy_from_slice(&(RedirectRecords::V1_SIZE as u16).to_ne_bytes());
        assert!(RedirectRecords::from_bytes(&short).is_err());
        r.set_client_command("a-very-long-command-name");
        assert_eq!(r.client_command().as_deref(), Some("a-very-long-com"));
    }

    #[test]
    fn the_seal_is_carried_as_read_and_cleared_by_changes() {
        let seal = offset_of!(connredir_record, seal);
        let mut issued = three_hops().to_bytes();
        issued[seal..seal + 8].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_ne_bytes());
        let read = RedirectRecords::from_bytes(&issued).unwrap();
        assert_eq!(read.to_bytes(), issued, "carried byte for byte");
        for change in [
            (|r: &mut RedirectRecords| r.set_client_command("x")) as fn(&mut RedirectRecords),
            |r| {
                r.set_client(ClientIdentity {
                    pid: 1,
                    uid: 2,
                    cgroup_id: 3,
                })
            },
            |r| r.push_hop(ServiceId(4), addr("10.0.0.1:1")).unwrap(),
        ] {
            let mut changed = read;
            change(&mut changed);
            assert_eq!(changed.raw.seal, 0, "a changed record is unsealed");
        }
        // A version 2 blob ends before the seal: nothing after it is one.
        let version = offset_of!(connredir_record, version);
        let size = offset_of!(connredir_record, size);
        let mut v2 = issued.clone();
        v2[version..version + 2].copy_from_slice(&2u16.to_ne_bytes());
        v2[size..size + 2].copy_from_slice(&(RedirectRecords::V2_SIZE as u16).to_ne_bytes());
        let back = RedirectRecords::from_bytes(&v2).unwrap();
        assert_eq!(back.raw.seal, 0);
        assert_eq!(back.chain(), three_hops().chain());
        v2.truncate(RedirectRecords::V2_SIZE);
        assert!(
            RedirectRecords::from_bytes(&v2).is_ok(),
            "a whole version 2 blob"
        );
        v2.pop();
        assert!(
            RedirectRecords::from_bytes(&v2).is_err(),
            "a short version 2 blob"
        );
    }

    #[test]
    fn states() {
        let r = three_hops();
        assert_eq!(r.state_for(ServiceId(3)), RedirectState::RedirectedBySelf);
        assert_eq!(
            r.state_for(ServiceId(1)),
            RedirectState::PreviouslyRedirectedBySelf
        );
        assert_eq!(
            r.state_for(ServiceId(2)),
            RedirectState::PreviouslyRedirectedBySelf
        );
        assert_eq!(r.state_for(ServiceId(7)), RedirectState::RedirectedByOther);
        assert_eq!(
            RedirectRecords::new().state_for(ServiceId(1)),
            RedirectState::NotRedirected
        );
        assert_eq!(
            redirect_state(None, ServiceId(1)),
            RedirectState::NotRedirected
        );
        assert_eq!(
            redirect_state(Some(&r), ServiceId(3)),
            RedirectState::RedirectedBySelf
        );
    }

    #[test]
    fn full_chain_refuses_another_hop() {
        let mut r = RedirectRecords::new();
        for id in 0..CONNREDIR_MAX_HOPS {
            r.push_hop(ServiceId(id), addr("10.0.0.1:1")).unwrap();
        }
        assert!(r.push_hop(ServiceId(99), addr("10.0.0.1:1")).is_err());
    }

    #[test]
    fn default_context_decodes() {
        let mut ctx = connredir_default_context {
            remote: connredir_endpoint::from_socket_addr(&addr("192.0.2.7:8443")),
            local: connredir_endpoint::from_socket_addr(&addr("127.0.0.1:40000")),
        };
        let decode = |ctx: &connredir_default_context| {
            RedirectContext(plain_bytes(ctx).to_vec()).original_addresses()
        };
        assert_eq!(
            decode(&ctx),
            Some((addr("192.0.2.7:8443"), Some(addr("127.0.0.1:40000"))))
        );
        ctx.local = connredir_endpoint::default();
        assert_eq!(decode(&ctx), Some((addr("192.0.2.7:8443"), None)));
        ctx.local.family = 7;
        assert_eq!(decode(&ctx), None, "unknown local family");
        ctx.local.family = 0;
        ctx.remote.family = 0;
        assert_eq!(decode(&ctx), None, "no remote address");
        // A service's own context: not a default context, whatever its size.
        assert_eq!(
            RedirectContext(b"policy".to_vec()).original_addresses(),
            None
        );
        let mut longer = plain_bytes(&ctx).to_vec();
        longer.push(0);
        assert_eq!(RedirectContext(longer).original_addresses(), None);
    }
}
