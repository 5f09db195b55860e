//! HTTP/1 requests in the client-to-server direction: each request head
//! (parsed with httparse), the host names it addresses (the Host header
//! and the request target's authority), and where its body ends
//! (Content-Length or chunked), so that every request of a keep-alive or
//! pipelined connection is found and checked, not only the first.
//!
//! The parser is strict on purpose: where a server could read the framing
//! in another way than the proxy (both Content-Length and
//! Transfer-Encoding, two different lengths, an unknown coding), the
//! request is refused rather than guessed at.

use serde::Serialize;

/// The most header lines a request head may have.
const MAX_HEADERS: usize = 128;

/// The longest chunk-size line (with extensions) or trailer line.
const MAX_LINE: usize = 4096;

/// An HTTP/1.x request, as far as the log and the policy care.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The Host header as sent, if any.
    pub host: Option<String>,
    /// The request target as sent.
    pub path: String,
}

/// Why a request is not one the proxy can vouch for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// httparse refused the head.
    #[error("not a valid HTTP/1 request head ({0})")]
    Malformed(httparse::Error),
    /// More than one Host header (RFC 9112: a server must refuse it).
    #[error("more than one Host header")]
    DuplicateHost,
    /// A Host header that is not a host name or address, with a port.
    #[error("a Host header that is not a host name: {0:?}")]
    BadHost(String),
    /// A request target that is no origin-, absolute-, authority- or
    /// asterisk-form target.
    #[error("a request target that names no host in a known way: {0:?}")]
    BadTarget(String),
    /// A Content-Length that is not one decimal number.
    #[error("a Content-Length that is not one number")]
    BadLength,
    /// Both Transfer-Encoding and Content-Length: servers differ on which
    /// wins, and that difference smuggles requests.
    #[error("both Transfer-Encoding and Content-Length")]
    Ambiguous,
    /// A Transfer-Encoding whose last coding is not `chunked`, or on an
    /// HTTP/1.0 request: the body's end cannot be known.
    #[error("a Transfer-Encoding that does not end in chunked")]
    BadTransferEncoding,
    /// A malformed chunk size, chunk end or trailer.
    #[error("a malformed chunked body")]
    BadChunk,
    /// A head, chunk-size or trailer line longer than the proxy reads.
    #[error("a request head or line longer than {0} bytes")]
    TooLong(usize),
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// Exactly this many bytes (0: none).
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// A complete request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// For the log.
    pub request: HttpRequest,
    /// The host names the request addresses, normalised (lower case, no
    /// port, no trailing dot): the Host header's and the target's.
    pub names: Vec<String>,
    /// Where its body ends.
    pub body: Body,
    /// A CONNECT or an Upgrade: what follows may be another protocol.
    pub switches: bool,
    /// The head's length in bytes.
    pub len: usize,
}

/// Parses the request head at the start of `buf`: `Ok(None)` while it is
/// incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf).map_err(HttpError::Malformed)? {
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(len) => len,
    };
    let method = req.method.unwrap_or_default();
    let path = req.path.unwrap_or_default();
    let mut host = None;
    let mut lengths = Vec::new();
    let mut codings = Vec::new();
    let mut switches = method == "CONNECT";
    for header in req.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        let name = header.name;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(HttpError::DuplicateHost);
            }
            host = Some(value.trim().to_string());
        } else if name.eq_ignore_ascii_case("content-length") {
            lengths.push(value.trim().to_string());
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            codings.extend(value.split(',').map(|c| c.trim().to_ascii_lowercase()));
        } else if name.eq_ignore_ascii_case("upgrade") {
            switches = true;
        }
    }
    let mut names = Vec::new();
    if let Some(value) = &host {
        names.push(authority_name(value).ok_or_else(|| HttpError::BadHost(value.clone()))?);
    }
    if let Some(name) = target_name(method, path)? {
        names.push(name);
    }
    let body = match (codings.is_empty(), lengths.is_empty()) {
        (true, true) => Body::Length(0),
        (true, false) => Body::Length(content_length(&lengths)?),
        (false, false) => return Err(HttpError::Ambiguous),
        (false, true) => {
            let chunked_last = codings.last().is_some_and(|c| c == "chunked");
            let chunked_once = codings.iter().filter(|c| *c == "chunked").count() == 1;
            if req.version != Some(1) || !chunked_last || !chunked_once {
                return Err(HttpError::BadTransferEncoding);
            }
            Body::Chunked
        }
    };
    Ok(Some(Head {
        request: HttpRequest {
            method: method.into(),
            host,
            path: path.into(),
        },
        names,
        body,
        switches,
        len,
    }))
}

/// Every Content-Length header must say the same decimal number.
fn content_length(values: &[String]) -> Result<u64, HttpError> {
    let first = &values[0];
    if values.iter().any(|v| v != first) || !first.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::BadLength);
    }
    first.parse().map_err(|_| HttpError::BadLength)
}

/// The host name a request target names: the authority of an absolute-form
/// target (`http://host:port/path`) or of CONNECT's authority-form; none
/// for origin-form (`/path`) and asterisk-form (`*`).
fn target_name(method: &str, target: &str) -> Result<Option<String>, HttpError> {
    let bad = || HttpError::BadTarget(target.to_string());
    if method == "CONNECT" {
        return authority_name(target).map(Some).ok_or_else(bad);
    }
    if target.starts_with('/') || target == "*" {
        return Ok(None);
    }
    let (scheme, rest) = target.split_once("://").ok_or_else(bad)?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !scheme_ok {
        return Err(bad());
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // Without its user information (`user:password@host`).
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    authority_name(host).map(Some).ok_or_else(bad)
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` as the name the policy
/// matches: lower case, without port, brackets or trailing dot. `None` for
/// anything else (a name with characters DNS names do not have, an empty
/// one, a port that is not a number).
pub fn authority_name(authority: &str) -> Option<String> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (addr, after) = v6.split_once(']')?;
            addr.parse::<std::net::Ipv6Addr>().ok()?;
            (
                addr,
                after.strip_prefix(':').or(after.is_empty().then_some(""))?,
            )
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, port),
            None => (authority, ""),
        },
    };
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let ok = !name.is_empty()
        && name.len() <= 255
        && (authority.starts_with('[')
            || name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)));
    ok.then(|| name.to_ascii_lowercase())
}

/// Where the client-to-server stream is: what the next bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A request head (or empty lines before one).
    Head,
    /// This many body bytes.
    Body(u64),
    /// A chunk-size line.
    ChunkSize,
    /// This many chunk data bytes, then CRLF.
    ChunkData(u64),
    /// The CRLF after chunk data.
    ChunkEnd,
    /// Trailer lines, up to an empty one.
    Trailers,
    /// Another protocol: forward everything as it is.
    Opaque,
}

/// What to do with the bytes at the front of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Forward this many bytes (body, framing).
    Forward(usize),
    /// A request head (`head.len` bytes): check it; if allowed, forward it
    /// and call [`Requests::allowed`].
    Request(Box<Head>),
    /// The bytes so far are incomplete: read more.
    NeedMore,
    /// No longer HTTP/1 (after an upgrade or CONNECT): forward everything
    /// from here on, unread.
    Opaque,
}

/// Follows the requests of one connection, from the client's side.
#[derive(Debug)]
pub struct Requests {
    state: State,
    /// The last request was a CONNECT or an upgrade.
    switched: bool,
    /// Requests seen so far.
    count: u64,
    /// The body of the request being allowed, set by [`Requests::allowed`].
    pending: Option<Body>,
}

impl Default for Requests {
    fn default() -> Requests {
        Requests {
            state: State::Head,
            switched: false,
            count: 0,
            pending: None,
        }
    }
}

impl Requests {
    /// How many request heads were found.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The next step for `buf`, the bytes read and not yet forwarded.
    pub fn next(&mut self, buf: &[u8]) -> Result<Step, HttpError> {
        match self.state {
            State::Opaque => Ok(Step::Opaque),
            State::Head => self.head(buf),
            State::Body(left) => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = left.min(buf.len() as u64);
                self.state = match left - n {
                    0 => State::Head,
                    rest => State::Body(rest),
                };
                Ok(Step::Forward(n as usize))
            }
            State::ChunkSize => {
                let Some(line) = line(buf)? else {
                    return Ok(Step::NeedMore);
                };
                // httparse takes a size without digits as 0: a server may not.
                if !buf[0].is_ascii_hexdigit() {
                    return Err(HttpError::BadChunk);
                }
                let size = match httparse::parse_chunk_size(&buf[..line]) {
                    Ok(httparse::Status::Complete((_, size))) => size,
                    _ => return Err(HttpError::BadChunk),
                };
                self.state = match size {
                    0 => State::Trailers,
                    size => State::ChunkData(size),
                };
                Ok(Step::Forward(line))
            }
            State::ChunkData(left) => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = left.min(buf.len() as u64);
                self.state = match left - n {
                    0 => State::ChunkEnd,
                    rest => State::ChunkData(rest),
                };
                Ok(Step::Forward(n as usize))
            }
            State::ChunkEnd => match buf {
                [b'\r', b'\n', ..] => {
                    self.state = State::ChunkSize;
                    Ok(Step::Forward(2))
                }
                [] | [b'\r'] => Ok(Step::NeedMore),
                _ => Err(HttpError::BadChunk),
            },
            State::Trailers => {
                let Some(len) = line(buf)? else {
                    return Ok(Step::NeedMore);
                };
                if len == 2 {
                    self.state = State::Head;
                } else if !buf[..len - 2].contains(&b':') {
                    return Err(HttpError::BadChunk);
                }
                Ok(Step::Forward(len))
            }
        }
    }

    fn head(&mut self, buf: &[u8]) -> Result<Step, HttpError> {
        if buf.is_empty() {
            return Ok(Step::NeedMore);
        }
        if self.switched {
            match looks(buf) {
                Looks::Request => {}
                Looks::Unsure => return Ok(Step::NeedMore),
                Looks::Other => {
                    self.state = State::Opaque;
                    return Ok(Step::Opaque);
                }
            }
        }
        match parse_head(buf) {
            Ok(Some(head)) => {
                self.count += 1;
                self.pending = Some(head.body);
                self.switched = head.switches;
                Ok(Step::Request(Box::new(head)))
            }
            Ok(None) if buf.len() >= crate::inspect::LIMIT => {
                Err(HttpError::TooLong(crate::inspect::LIMIT))
            }
            Ok(None) => Ok(Step::NeedMore),
            Err(e) => Err(e),
        }
    }

    /// The request of the last [`Step::Request`] was allowed and its head
    /// forwarded: its body comes next.
    pub fn allowed(&mut self) {
        self.state = match self.pending.take() {
            Some(Body::Length(0)) | None => State::Head,
            Some(Body::Length(n)) => State::Body(n),
            Some(Body::Chunked) => State::ChunkSize,
        };
    }
}

/// The length of the CRLF-ended line at the start of `buf`, CRLF included;
/// `None` while incomplete.
fn line(buf: &[u8]) -> Result<Option<usize>, HttpError> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(at) if at <= MAX_LINE => Ok(Some(at + 2)),
        Some(_) => Err(HttpError::TooLong(MAX_LINE)),
        None if buf.len() > MAX_LINE => Err(HttpError::TooLong(MAX_LINE)),
        None => Ok(None),
    }
}

/// What the bytes after an upgrade or CONNECT are.
#[derive(Debug, PartialEq, Eq)]
enum Looks {
    /// A request line, or the start of one: checked as a request.
    Request,
    /// Too few bytes to tell.
    Unsure,
    /// Another protocol (the HTTP/2 preface included).
    Other,
}

/// Whether `buf` starts like a request line (a token, then a space): after
/// an upgrade or CONNECT, such bytes are checked as a request, anything
/// else is the new protocol.
fn looks(buf: &[u8]) -> Looks {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
    if buf.starts_with(PREFACE) {
        return Looks::Other;
    }
    if PREFACE.starts_with(buf) {
        return Looks::Unsure;
    }
    let skipped = buf.iter().take_while(|b| **b == b'\r' || **b == b'\n');
    let rest = &buf[skipped.count()..];
    let token = rest.iter().take_while(|b| is_tchar(**b)).count();
    match rest.get(token) {
        _ if rest.is_empty() => Looks::Unsure,
        Some(b' ') if token > 0 => Looks::Request,
        None => Looks::Request,
        Some(_) => Looks::Other,
    }
}

/// Whether `buf` starts like a request line, or may still: a token, then a
/// space.
pub fn looks_like_a_request_line(buf: &[u8]) -> bool {
    looks(buf) != Looks::Other
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, HttpError> {
        parse_head(text.as_bytes())
    }

    fn names(text: &str) -> Vec<String> {
        head(text).unwrap().unwrap().names
    }

    #[test]
    fn names_from_the_host_header_and_the_target() {
        assert_eq!(
            names("GET / HTTP/1.1\r\nHost: Example.COM.:8080\r\n\r\n"),
            ["example.com"]
        );
        assert_eq!(
            names("GET http://user:pw@Denied.Example:80/x?y HTTP/1.1\r\nHost: ok.test\r\n\r\n"),
            ["ok.test", "denied.example"]
        );
        assert_eq!(
            names("CONNECT denied.example:443 HTTP/1.1\r\nHost: ok.test\r\n\r\n"),
            ["ok.test", "denied.example"]
        );
        assert_eq!(names("GET http://[::1]:8/ HTTP/1.0\r\n\r\n"), ["::1"]);
        assert_eq!(names("OPTIONS * HTTP/1.1\r\n\r\n"), Vec::<String>::new());
        assert_eq!(names("GET / HTTP/1.0\n\n"), Vec::<String>::new());
        for bad in [
            "GET denied.example/ HTTP/1.1\r\n\r\n",
            "GET http:///x HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: ok.test, denied.example\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a:x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
        ] {
            assert!(head(bad).is_err(), "{bad:?}");
        }
        assert_eq!(head("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
    }

    #[test]
    fn body_framing() {
        let body = |t: &str| head(t).map(|h| h.unwrap().body);
        assert_eq!(body("GET / HTTP/1.1\r\n\r\n"), Ok(Body::Length(0)));
        assert_eq!(
            body("POST / HTTP/1.1\r\nContent-Length: 12\r\ncontent-length: 12\r\n\r\n"),
            Ok(Body::Length(12))
        );
        assert_eq!(
            body("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"),
            Ok(Body::Chunked)
        );
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(head(bad).is_err(), "{bad:?}");
        }
    }

    /// Runs `stream` through [`Requests`], allowing every request, fed in
    /// pieces of `piece` bytes; returns the request targets and what was
    /// forwarded.
    fn follow(stream: &[u8], piece: usize) -> Result<(Vec<String>, Vec<u8>), HttpError> {
        let mut requests = Requests::default();
        let (mut buf, mut forwarded, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        let mut fed = 0;
        loop {
            match requests.next(&buf)? {
                Step::Forward(n) => {
                    forwarded.extend(buf.drain(..n));
                }
                Step::Request(head) => {
                    targets.push(head.request.path.clone());
                    forwarded.extend(buf.drain(..head.len));
                    requests.allowed();
                }
                Step::Opaque => {
                    forwarded.append(&mut buf);
                    forwarded.extend(&stream[fed..]);
                    return Ok((targets, forwarded));
                }
                Step::NeedMore if fed == stream.len() => return Ok((targets, forwarded)),
                Step::NeedMore => {
                    let end = (fed + piece).min(stream.len());
                    buf.extend(&stream[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn every_request_is_found_whatever_the_pieces() {
        let fake = "GET /fake HTTP/1.1\r\nHost: denied.example\r\n\r\n";
        let stream = format!(
            "GET /1 HTTP/1.1\r\nHost: a\r\n\r\n\r\n\
             POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{fake}\
             POST /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{fake}\r\n3;x=\"y\"\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n\
             GET /4 HTTP/1.0\r\n\r\n",
            fake.len(),
            fake.len()
        );
        for piece in [1, 2, 3, 7, 64, 100_000] {
            let (targets, forwarded) = follow(stream.as_bytes(), piece).unwrap();
            assert_eq!(targets, ["/1", "/2", "/3", "/4"], "pieces of {piece}");
            assert_eq!(forwarded, stream.as_bytes(), "pieces of {piece}");
        }
        for bad in [
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nz\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nno colon\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ] {
            assert!(follow(bad.as_bytes(), 1).is_err(), "{bad:?}");
        }
        let endless = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(20_000));
        assert_eq!(
            follow(endless.as_bytes(), 4096),
            Err(HttpError::TooLong(crate::inspect::LIMIT))
        );
    }

    #[test]
    fn garbage_after_a_request_never_panics() {
        let mut state = 0x9e37_79b9u32;
        let mut random = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    // Mostly the bytes framing is made of.
                    let alphabet = b"0123456789abcdefGET /:\r\n \x16\xff";
                    alphabet[state as usize % alphabet.len()]
                })
                .collect()
        };
        let starts = [
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 7\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: x\r\n\r\n",
        ];
        for round in 0..4000 {
            let mut stream = starts[round % starts.len()].as_bytes().to_vec();
            stream.extend(random(1 + round % 200));
            for piece in [1, 13, 4096] {
                let _ = follow(&stream, piece);
            }
        }
    }

    #[test]
    fn after_an_upgrade_requests_are_still_checked_and_other_bytes_pass() {
        let upgrade = "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n";
        let frame = [0x81u8, 0x85, 1, 2, 3, 4, b'h', b'e', b'l', b'l', b'o'];
        let mut stream = upgrade.as_bytes().to_vec();
        stream.extend(frame);
        stream.extend(b"GET /not-a-request HTTP/1.1\r\n\r\n");
        let (targets, forwarded) = follow(&stream, 5).unwrap();
        assert_eq!((targets, forwarded), (vec!["/ws".to_string()], stream));
        // Refused by the server: the next request is a request.
        let again = format!("{upgrade}GET /next HTTP/1.1\r\nHost: b\r\n\r\n");
        let (targets, _) = follow(again.as_bytes(), 3).unwrap();
        assert_eq!(targets, ["/ws", "/next"]);
        let broken = format!("{upgrade}GET /next HTTP/1.1\r\nHost : b\r\n\r\n");
        assert!(follow(broken.as_bytes(), 3).is_err());
        let h2c = format!("{upgrade}PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let (targets, _) = follow(h2c.as_bytes(), 2).unwrap();
        assert_eq!(targets, ["/ws"]);
        let tunnel = "CONNECT a:443 HTTP/1.1\r\n\r\n\x16\x03\x01\x00\x05hello";
        let (targets, forwarded) = follow(tunnel.as_bytes(), 4).unwrap();
        assert_eq!((targets.len(), forwarded), (1, tunnel.as_bytes().to_vec()));
    }
}
