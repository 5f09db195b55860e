//! Recognises the first bytes a client sends: the server name of a TLS
//! ClientHello, or the request line and Host of an HTTP/1.x request.
//! Whatever is read is forwarded unchanged, recognised or not.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::http::{self, HttpRequest};

/// Inspection reads at most this much before giving up.
pub const LIMIT: usize = 16 * 1024;

/// The longest method the first bytes may start with to be taken for HTTP.
const MAX_METHOD: usize = 32;

/// The inspection buffer's first size; it doubles up to [`LIMIT`].
const FIRST_READ: usize = 2 * 1024;

/// What inspection found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspection {
    /// TLS SNI host name, lower case.
    pub server_name: Option<String>,
    /// The HTTP request.
    pub http: Option<HttpRequest>,
    /// The names the policy matches, normalised (lower case, no port, no
    /// trailing dot): the SNI; or the HTTP Host header's and the request
    /// target's (an absolute-form or CONNECT target names a host too).
    pub names: Vec<String>,
    /// Why bytes that were recognised (as a ClientHello or an HTTP
    /// request) or not yielded no name.
    pub flaw: Option<String>,
}

/// Whether the bytes so far are enough to decide.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// A prefix of something recognisable: read more.
    NeedMore,
    /// Finished: found something, or nothing will be found.
    Done(Inspection),
}

/// Looks at the bytes a client sent so far.
pub fn examine(buf: &[u8]) -> Progress {
    match buf.first() {
        None => Progress::NeedMore,
        Some(0x16) => tls(buf),
        Some(_) => http(buf),
    }
}

/// Why reading the first bytes stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// [`examine`] was done.
    Done,
    /// The time was up.
    Timeout,
    /// [`LIMIT`] bytes without [`examine`] being done.
    Limit,
    /// The client shut its side down first.
    Eof,
}

/// The first bytes of a connection and what they are.
#[derive(Debug)]
pub struct FirstBytes {
    /// Everything read, to forward before relaying the rest.
    pub bytes: Vec<u8>,
    /// The client shut its side down already.
    pub eof: bool,
    /// What was recognised.
    pub inspection: Inspection,
    /// Why reading stopped.
    pub stop: Stop,
}

impl FirstBytes {
    /// Why these bytes named no host, for the log (`inspection`: what
    /// they were recognised as, which the caller may have moved out of
    /// `self.inspection`; `waited`: how long reading could take).
    pub fn why_no_name(&self, inspection: &Inspection, waited: Duration) -> String {
        if let Some(flaw) = &inspection.flaw {
            return flaw.clone();
        }
        let what = "a complete TLS ClientHello or HTTP request head";
        match self.stop {
            Stop::Timeout if self.bytes.is_empty() => format!("nothing sent in {waited:?}"),
            Stop::Timeout => format!("no {what} in {waited:?}"),
            Stop::Limit => format!("no {what} in the first {} KiB", LIMIT / 1024),
            Stop::Eof => format!("the client closed before sending {what}"),
            Stop::Done if inspection.http.is_some() => "an HTTP request that names no host".into(),
            Stop::Done => "neither a TLS ClientHello nor an HTTP/1 request".into(),
        }
    }
}

/// Reads from `client` until [`examine`] is done, [`LIMIT`] bytes, EOF, or
/// `timeout`, whichever comes first.
pub async fn read_first(client: &TcpStream, timeout: Duration) -> io::Result<FirstBytes> {
    let deadline = Instant::now() + timeout;
    // Start small and grow up to LIMIT: most first flights (an HTTP
    // request head, a TLS ClientHello) fit in a few KiB, and many
    // connections are inspected at once.
    let mut buf = vec![0u8; FIRST_READ];
    let mut len = 0;
    let mut inspection = Inspection::default();
    let stop = loop {
        if let Progress::Done(found) = examine(&buf[..len]) {
            inspection = found;
            break Stop::Done;
        }
        if len == LIMIT {
            break Stop::Limit;
        }
        if len == buf.len() {
            buf.resize((len * 2).min(LIMIT), 0);
        }
        match tokio::time::timeout_at(deadline, client.readable()).await {
            Err(_) => break Stop::Timeout, // a client that waits for the server first, or a slow one
            Ok(ready) => ready?,
        }
        match client.try_read(&mut buf[len..]) {
            Ok(0) => break Stop::Eof,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    };
    buf.truncate(len);
    Ok(FirstBytes {
        bytes: buf,
        eof: stop == Stop::Eof,
        inspection,
        stop,
    })
}

/// A bounds-checked reader over a byte slice: every read is an `Option`.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self) -> Option<Reader<'a>> {
        let n = self.u8()?;
        self.take(n.into()).map(Reader)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self) -> Option<Reader<'a>> {
        let n = self.u16()?;
        self.take(n.into()).map(Reader)
    }
}

/// TLS: handshake records (0x16, version 3.x) whose payloads, joined, start
/// with a ClientHello (type 1, 24-bit length).
fn tls(buf: &[u8]) -> Progress {
    let nothing = flawed("TLS, but not a ClientHello");
    let mut handshake = Vec::new();
    let mut rest = Reader(buf);
    loop {
        if let [kind, a, b, c, ..] = handshake[..] {
            if kind != 1 {
                return nothing;
            }
            let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            if let Some(body) = handshake.get(4..4 + len) {
                let Some(name) = client_hello_sni(body) else {
                    return flawed("a TLS ClientHello without a usable server name");
                };
                return Progress::Done(Inspection {
                    server_name: Some(name.clone()),
                    names: vec![name],
                    ..Inspection::default()
                });
            }
        }
        // The message is not complete yet: join the next record.
        match next_record(&mut rest, &mut handshake) {
            Some(true) => {}
            Some(false) => return nothing,
            None => return Progress::NeedMore,
        }
    }
}

/// Appends the next handshake record's payload. `Some(false)`: not a TLS
/// handshake record; `None`: incomplete.
fn next_record(rest: &mut Reader<'_>, handshake: &mut Vec<u8>) -> Option<bool> {
    let &[kind, major, ..] = rest.0 else {
        return None;
    };
    if kind != 0x16 || major != 3 {
        return Some(false);
    }
    let mut peek = Reader(rest.0);
    let payload = peek.take(3).and_then(|_| peek.vec16())?;
    handshake.extend_from_slice(payload.0);
    *rest = peek;
    Some(true)
}

/// The `host_name` of a ClientHello body's server_name extension.
fn client_hello_sni(body: &[u8]) -> Option<String> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    let mut extensions = r.vec16()?;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vec16()?;
        if kind != 0 {
            continue;
        }
        let mut names = data.vec16()?;
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name = names.vec16()?;
            if name_type == 0 {
                return host_name(name.0);
            }
        }
        return None;
    }
    None
}

/// A DNS name made of safe characters, lower case; anything else is `None`
/// (the logs must not carry what a hostile client put there).
fn host_name(bytes: &[u8]) -> Option<String> {
    let ok = (1..=255).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(b));
    ok.then(|| String::from_utf8_lossy(bytes).to_ascii_lowercase())
}

/// Done with nothing found, for this reason.
fn flawed(why: &str) -> Progress {
    Progress::Done(Inspection {
        flaw: Some(why.into()),
        ..Inspection::default()
    })
}

/// HTTP/1.x: a complete request head (see [`http::parse_head`]).
fn http(buf: &[u8]) -> Progress {
    // No method is this long: another protocol, known at once.
    if !buf[..buf.len().min(MAX_METHOD + 1)].contains(&b' ') && buf.len() > MAX_METHOD {
        return Progress::Done(Inspection::default());
    }
    match http::parse_head(buf) {
        Ok(None) => Progress::NeedMore,
        Ok(Some(head)) => Progress::Done(Inspection {
            http: Some(head.request),
            names: head.names,
            ..Inspection::default()
        }),
        // Bytes of another protocol: say nothing about HTTP.
        Err(http::HttpError::Malformed(_)) if !http::looks_like_a_request_line(buf) => {
            Progress::Done(Inspection::default())
        }
        Err(e) => flawed(&e.to_string()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ClientHello captured from `openssl s_client -servername
    /// www.example.com -groups X25519 -tls1_3` (OpenSSL 3.0).
    const OPENSSL_HELLO: &str = "\
        16030100da010000d60303aa250fefdefe819b9289ff66dc648270b7a869bb589ea875069d1cabbb\
        cdd21920c69e1c67ddd06435b28cc663780bb878bb6a5a0c8e70f2e96ff2b3ad209d774400041301\
        00ff0100008900000014001200000f7777772e6578616d706c652e636f6d000b000403000102000a\
        00040002001d0016000000170000000d001e001c040305030603080708080809080a080b08040805\
        0806040105010601002b0003020304002d00020101003300260024001d0020508ffc840e8ff55175\
        1a019f504b1e762894d1a69f162ed17b0763c5ba30be24";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn with_len16(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    /// A minimal ClientHello for `sni`, split into records of `record` bytes.
    pub(crate) fn client_hello(sni: &str, record: usize) -> Vec<u8> {
        let mut name = vec![0u8]; // host_name
        name.extend(with_len16(sni.as_bytes()));
        let mut ext = vec![0xff, 0x01, 0, 1, 0]; // renegotiation_info first
        ext.extend([0, 0]); // server_name
        ext.extend(with_len16(&with_len16(&name)));
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.extend([0]); // no session id
        body.extend(with_len16(&[0x13, 0x01]));
        body.extend([1, 0]);
        body.extend(with_len16(&ext));
        let len = (body.len() as u32).to_be_bytes();
        let mut handshake = vec![1, len[1], len[2], len[3]];
        handshake.extend(body);
        let mut out = Vec::new();
        for chunk in handshake.chunks(record) {
            out.extend([0x16, 3, 1]);
            out.extend(with_len16(chunk));
        }
        out
    }

    fn named(name: &str) -> Progress {
        Progress::Done(Inspection {
            server_name: Some(name.into()),
            names: vec![name.into()],
            ..Inspection::default()
        })
    }

    #[test]
    fn real_client_hello() {
        let hello = unhex(OPENSSL_HELLO);
        assert_eq!(examine(&hello), named("www.example.com"));
        for cut in 0..hello.len() {
            assert_eq!(examine(&hello[..cut]), Progress::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn built_client_hello_in_one_or_many_records() {
        for record in [1000, 40, 7, 1] {
            let hello = client_hello("API.Example.org", record);
            assert_eq!(
                examine(&hello),
                named("api.example.org"),
                "records of {record}"
            );
            assert_eq!(examine(&hello[..hello.len() - 1]), Progress::NeedMore);
        }
    }

    /// Done, without a name.
    fn nameless(progress: &Progress) -> bool {
        matches!(progress, Progress::Done(found) if found.names.is_empty())
    }

    #[test]
    fn malformed_tls_never_panics() {
        for (bad, what) in [
            (&[0x16, 9, 1, 0, 4, 1, 0, 0, 0], "not TLS 3.x"),
            (&[0x16, 3, 1, 0, 4, 2, 0, 0, 0], "not a ClientHello"),
            (&[0x16, 3, 1, 0, 4, 1, 0, 0, 0], "empty body"),
        ] {
            assert!(nameless(&examine(bad)), "{what}");
        }
        let hello = client_hello("example.com", 1000);
        // Every single-byte corruption and every length field lying.
        for at in 0..hello.len() {
            for value in [0x00, 0x01, 0x7f, 0xff] {
                let mut bad = hello.clone();
                bad[at] = value;
                let _ = examine(&bad);
            }
        }
        let mut state = 0x1234_5678u32;
        for _ in 0..2000 {
            let garbage: Vec<u8> = (0..64)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    state as u8
                })
                .collect();
            let mut tls = vec![0x16, 3, 1, 0, 60, 1, 0, 0, 56];
            tls.extend(&garbage[..55]);
            let _ = examine(&tls);
            let _ = examine(&garbage);
        }
        let hostile = examine(&client_hello("evil\"name\n", 1000));
        assert!(nameless(&hostile), "unsafe characters are not a host name");
        let Progress::Done(found) = hostile else {
            unreachable!()
        };
        assert!(found.flaw.unwrap().contains("without a usable server name"));
    }

    #[test]
    fn http_requests() {
        let req =
            b"GET /index.html?q=1 HTTP/1.1\r\nUser-Agent: x\r\nhOST: Example.COM:8080\r\n\r\n";
        let found = Progress::Done(Inspection {
            http: Some(HttpRequest {
                method: "GET".into(),
                host: Some("Example.COM:8080".into()),
                path: "/index.html?q=1".into(),
            }),
            names: vec!["example.com".into()],
            ..Inspection::default()
        });
        assert_eq!(examine(req), found);
        // The whole head, up to the empty line.
        for cut in 0..req.len() {
            assert_eq!(examine(&req[..cut]), Progress::NeedMore, "cut at {cut}");
        }
        let old = examine(b"GET / HTTP/1.0\n\n");
        let Progress::Done(Inspection { http: Some(r), .. }) = old else {
            panic!("{old:?}")
        };
        assert_eq!(
            (r.method.as_str(), r.host, r.path.as_str()),
            ("GET", None, "/")
        );
        // The absolute-form target's host counts too.
        let Progress::Done(found) =
            examine(b"GET http://Denied.Example/x HTTP/1.1\r\nHost: ok.test\r\n\r\n")
        else {
            panic!()
        };
        assert_eq!(found.names, ["ok.test", "denied.example"]);
        // A request the proxy cannot vouch for says why.
        let Progress::Done(found) = examine(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n") else {
            panic!()
        };
        assert_eq!(found.flaw.as_deref(), Some("more than one Host header"));
    }

    #[test]
    fn not_http_is_done_at_once() {
        let nothing = Progress::Done(Inspection::default());
        for other in [
            &b"SSH-2.0-OpenSSH_9.6\r\n"[..],
            b"EHLO\r\n",
            b"\x00\x01\x02",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJ",
        ] {
            assert_eq!(
                examine(other),
                nothing,
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
        // Like a request line, but not HTTP/1: done, and says so.
        let spdy = examine(b"GET / SPDY/3\r\n");
        assert!(nameless(&spdy), "{spdy:?}");
    }
}
