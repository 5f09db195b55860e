//! Moves bytes between two connected sockets, each direction on its own:
//! EOF on one side shuts down the other's write side while the other
//! direction goes on; an error or an idle timeout ends both.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Bytes moved per splice: one pipe's default capacity.
const CHUNK: usize = 64 * 1024;

/// Bytes moved per read of the copy loop.
const COPY_CHUNK: usize = 256 * 1024;

/// In splice mode, a direction starts by copying, in reads of at most
/// this many bytes: most flows are a few hundred bytes, for which two pipes
/// (and their creation and closing) cost more than they save.
const FIRST_BUFFER: usize = 16 * 1024;

/// A direction switches to splice once it has copied this many bytes, or
/// sooner when a read fills [`FIRST_BUFFER`]: then it is a bulk flow.
const SPLICE_AFTER: u64 = 64 * 1024;

/// How many times a direction asks for the cut-through while its writer
/// keeps having bytes in flight, before it stays in the proxy.
const CUT_THROUGH_ATTEMPTS: usize = 64;

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Zero-copy, socket → pipe → socket with `splice(2)`, for the bulk of
    /// a flow: each direction copies its first bytes, and splices once it
    /// has moved [`SPLICE_AFTER`] bytes or a read filled its buffer. Not
    /// for a socket accelerated through sockmap: see [`plan`].
    Splice,
    /// Read into a buffer, write it out.
    Copy,
}

/// How a flow's two directions move, from what the layer says of its
/// sockets (see [`plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Client → server.
    pub up: Mode,
    /// Server → client.
    pub down: Mode,
    /// Both sockets are accelerated through sockmap and cut-through is
    /// allowed: once the flow is inspected and allowed, both directions go
    /// to the kernel (see [`pump_cut_through`]).
    pub cut_through: bool,
}

/// The plan for a flow, from `wanted` and what the layer says of the two
/// sockets. A socket accelerated through sockmap is read by copying (its
/// data arrives in the socket's own queue, which splice does not read;
/// splicing into one is fine).
///
/// Ask before the directions move any byte: asking a busy accelerated
/// socket whether it is accelerated, between reads, was seen to end its
/// stream early.
///
/// Both sockets are asked even when this proxy's service does not
/// accelerate: its own setting does not decide either answer. The client
/// socket joins when its peer did (a client of an accelerating service
/// earlier in a chain, whose onward socket goes to loopback), the onward
/// socket when its destination is an accelerating service's address.
pub fn plan(client: &TcpStream, server: &TcpStream, wanted: Mode, cut_through: bool) -> Plan {
    if wanted == Mode::Copy {
        // Nothing to ask: copy mode means every byte through the proxy.
        return Plan {
            up: Mode::Copy,
            down: Mode::Copy,
            cut_through: false,
        };
    }
    let accelerated = |socket| matches!(connredir::is_accelerated(socket), Ok(true));
    let (client_fast, server_fast) = (accelerated(client), accelerated(server));
    let reading = |fast: bool| if fast { Mode::Copy } else { wanted };
    Plan {
        up: reading(client_fast),
        down: reading(server_fast),
        cut_through: cut_through && client_fast && server_fast,
    }
}

/// Where a cut-through direction writes: the `to` socket's own address
/// and its peer's (the layer names sockets by their 4-tuple).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ends {
    /// The socket's own address.
    pub local: SocketAddr,
    /// Its peer's.
    pub peer: SocketAddr,
}

/// A direction of the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// Why a relay ended early.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// No byte moved either way for this long.
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// Client → server failed.
    #[error("client to server: {0}")]
    Up(#[source] io::Error),
    /// Server → client failed.
    #[error("server to client: {0}")]
    Down(#[source] io::Error),
}

impl RelayError {
    /// The error of `dir`.
    pub fn io(dir: Direction) -> fn(io::Error) -> RelayError {
        match dir {
            Direction::Up => RelayError::Up,
            Direction::Down => RelayError::Down,
        }
    }
}

/// Byte counts and the time of the last byte, shared by both directions
/// (atomics, so the futures stay `Send`).
#[derive(Debug)]
pub struct Traffic {
    start: Instant,
    last_nanos: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
    spliced: AtomicU64,
    cut_up: AtomicBool,
    cut_down: AtomicBool,
}

impl Default for Traffic {
    /// Nothing moved yet; idle time counts from now.
    fn default() -> Traffic {
        Traffic {
            start: Instant::now(),
            last_nanos: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            spliced: AtomicU64::new(0),
            cut_up: AtomicBool::new(false),
            cut_down: AtomicBool::new(false),
        }
    }
}

impl Traffic {
    /// Bytes moved client → server.
    pub fn up(&self) -> u64 {
        self.up.load(Ordering::Relaxed)
    }

    /// Bytes moved server → client.
    pub fn down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }

    /// Bytes either way that went through a pipe (`splice(2)`), not
    /// through a buffer.
    pub fn spliced(&self) -> u64 {
        self.spliced.load(Ordering::Relaxed)
    }

    /// The byte counter of `dir`.
    fn counter(&self, dir: Direction) -> &AtomicU64 {
        match dir {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }

    /// Bytes moved in `dir` by the proxy.
    fn count(&self, dir: Direction) -> u64 {
        self.counter(dir).load(Ordering::Relaxed)
    }

    /// The directions handed to the kernel (cut-through): their later
    /// bytes do not pass through the proxy, so are not counted here.
    pub fn cut_through(&self) -> Vec<Direction> {
        let cut = [
            (Direction::Up, &self.cut_up),
            (Direction::Down, &self.cut_down),
        ];
        cut.into_iter()
            .filter(|(_, flag)| flag.load(Ordering::Relaxed))
            .map(|(dir, _)| dir)
            .collect()
    }

    fn cut(&self, dir: Direction) {
        match dir {
            Direction::Up => &self.cut_up,
            Direction::Down => &self.cut_down,
        }
        .store(true, Ordering::Relaxed);
    }

    /// Raises the count of `dir` to `total`, the layer's count of a
    /// cut-through direction.
    fn saw_total(&self, dir: Direction, total: u64) {
        self.counter(dir).fetch_max(total, Ordering::Relaxed);
    }

    /// Counts `n` bytes moved in `dir`, now.
    pub fn moved(&self, dir: Direction, n: usize) {
        self.counter(dir).fetch_add(n as u64, Ordering::Relaxed);
        self.active();
    }

    /// Notes that the flow is active now.
    fn active(&self) {
        let now = self.start.elapsed().as_nanos() as u64;
        self.last_nanos.fetch_max(now, Ordering::Relaxed);
    }

    /// Returns once no byte has moved for `limit`. Bytes of a cut-through
    /// direction do not pass here: the layer's count of them, read from
    /// the two sockets, tells whether they still move.
    async fn idle(&self, limit: Duration, ends: [&TcpStream; 2]) {
        let mut kernel_seen = None;
        loop {
            let last = self.start + Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed));
            if Instant::now() >= last + limit {
                if self.cut_through().is_empty() {
                    return;
                }
                let written = ends
                    .iter()
                    .map(|end| connredir::bytes_written_into(*end).unwrap_or(0))
                    .sum::<u64>();
                if kernel_seen == Some(written) {
                    return;
                }
                kernel_seen = Some(written);
                self.active();
                continue;
            }
            tokio::time::sleep_until(last + limit).await;
        }
    }
}

/// Runs two directions to completion; the first error, or idleness, ends
/// both. `ends` are the client's and the server's sockets (the caller
/// closes them afterwards).
pub async fn supervise<E: From<RelayError>>(
    up: impl Future<Output = Result<(), E>>,
    down: impl Future<Output = Result<(), E>>,
    idle: Duration,
    traffic: &Traffic,
    ends: [&TcpStream; 2],
) -> Result<(), E> {
    tokio::select! {
        done = async { tokio::try_join!(up, down) } => done.map(|_| ()),
        () = traffic.idle(idle, ends) => Err(RelayError::Idle(idle).into()),
    }
}

/// Moves bytes `from` → `to` until EOF, then shuts down `to`'s write side.
pub async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    mode: Mode,
    dir: Direction,
    traffic: &Traffic,
) -> Result<(), RelayError> {
    let moved = match mode {
        Mode::Splice => copy_then_splice(from, to, dir, traffic).await,
        Mode::Copy => copy_all(from, to, dir, traffic).await,
    };
    moved
        .and_then(|()| shutdown_write(to))
        .map_err(RelayError::io(dir))
}

/// Writes all of `buf` to `to`, counting it as moved in `dir`.
pub async fn write_all(
    to: &TcpStream,
    mut buf: &[u8],
    dir: Direction,
    traffic: &Traffic,
) -> io::Result<()> {
    while !buf.is_empty() {
        to.writable().await?;
        match to.try_write(buf) {
            Ok(n) => {
                traffic.moved(dir, n);
                buf = &buf[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Half-closes `stream`: the peer reads EOF, the other direction goes on.
pub fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    // SAFETY: shutdown on a descriptor `stream` owns; no memory involved.
    if unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) } == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        // The peer is gone already: nothing left to tell it.
        e if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        e => Err(e),
    }
}

/// The plain loop, until EOF.
async fn copy_all(
    from: &TcpStream,
    to: &TcpStream,
    dir: Direction,
    traffic: &Traffic,
) -> io::Result<()> {
    copy_until(from, to, dir, traffic, COPY_CHUNK, |_| false).await?;
    Ok(())
}

/// Copies reads of at most `max_read` bytes until EOF (returns true) or
/// until `bulk(n)` says a read of `n` bytes makes this a bulk flow (returns
/// false, everything read written out). Reads go into the worker thread's
/// scratch buffer (one large buffer per thread, not per connection) and are
/// written out at once; only what the writer cannot take yet is kept, in
/// `pending`, and flushed before the next read. So a slow reader slows the
/// writer, and a connection waiting for data holds no buffer.
async fn copy_until(
    from: &TcpStream,
    to: &TcpStream,
    dir: Direction,
    traffic: &Traffic,
    max_read: usize,
    mut bulk: impl FnMut(usize) -> bool,
) -> io::Result<bool> {
    let mut pending = Vec::new();
    loop {
        if !pending.is_empty() {
            write_all(to, &pending, dir, traffic).await?;
            pending = Vec::new();
        }
        from.readable().await?;
        let step = SCRATCH.with_borrow_mut(|buf| {
            let buf = &mut buf[..max_read.min(COPY_CHUNK)];
            let n = match from.try_read(buf) {
                Ok(0) => return Ok(Step::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Again),
                Err(e) => return Err(e),
            };
            let mut written = 0;
            while written < n {
                match to.try_write(&buf[written..n]) {
                    Ok(k) => written += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            traffic.moved(dir, written);
            pending.extend_from_slice(&buf[written..n]);
            Ok(Step::Read(n))
        })?;
        match step {
            Step::Eof => return Ok(true),
            Step::Read(n) if bulk(n) => {
                write_all(to, &pending, dir, traffic).await?;
                return Ok(false);
            }
            Step::Read(_) | Step::Again => {}
        }
    }
}

/// What one read of [`copy_until`] found.
enum Step {
    Eof,
    Again,
    Read(usize),
}

thread_local! {
    /// The copy buffer of this worker thread: large, so a bulk flow moves in
    /// few system calls (it matters most on sockmap-accelerated sockets,
    /// where every byte is copied in and out of the proxy).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; COPY_CHUNK]);
}

/// Copies the first bytes of a direction, until it turns out to be bulk
/// (see [`SPLICE_AFTER`]); true at EOF.
async fn copy_first_bytes(
    from: &TcpStream,
    to: &TcpStream,
    dir: Direction,
    traffic: &Traffic,
) -> io::Result<bool> {
    let mut copied = 0u64;
    let turned_bulk = |n: usize| {
        copied += n as u64;
        n == FIRST_BUFFER || copied >= SPLICE_AFTER
    };
    copy_until(from, to, dir, traffic, FIRST_BUFFER, turned_bulk).await
}

/// Splice mode: copies the first bytes; a direction that turns out to be
/// bulk goes on with splice, so short flows never create pipes.
async fn copy_then_splice(
    from: &TcpStream,
    to: &TcpStream,
    dir: Direction,
    traffic: &Traffic,
) -> io::Result<()> {
    if copy_first_bytes(from, to, dir, traffic).await? {
        return Ok(()); // EOF
    }
    splice_all(from, to, dir, traffic).await
}

/// Moves bytes `from` → `to` (both accelerated) by copying until
/// `inspected` resolves (the flow was inspected and allowed), then hands
/// the direction to the kernel, which moves the rest straight from `from`'s
/// peer to `to`'s (`to_ends`); at EOF, shuts down `to`'s write side.
///
/// The layer accepts only once every byte written into `from` has been
/// read here (and so written on): until then it answers "in flight", and
/// the proxy forwards what came and asks again. A writer that never pauses
/// can keep the direction in the proxy; after [`CUT_THROUGH_ATTEMPTS`] it
/// stays there.
pub async fn pump_cut_through(
    from: &TcpStream,
    to: &TcpStream,
    to_ends: Ends,
    dir: Direction,
    traffic: &Traffic,
    inspected: impl Future<Output = ()>,
) -> Result<(), RelayError> {
    copy_then_cut_through(from, to, to_ends, dir, traffic, inspected)
        .await
        .and_then(|()| shutdown_write(to))
        .map_err(RelayError::io(dir))
}

async fn copy_then_cut_through(
    from: &TcpStream,
    to: &TcpStream,
    to_ends: Ends,
    dir: Direction,
    traffic: &Traffic,
    inspected: impl Future<Output = ()>,
) -> io::Result<()> {
    // Until the decision, copy: a server may speak first.
    let mut inspected = std::pin::pin!(inspected);
    loop {
        let data = tokio::select! {
            biased;
            () = &mut inspected => false,
            ready = from.readable() => ready.map(|()| true)?,
        };
        if !data {
            break;
        }
        // One read, all of it written: not cancelled half way.
        if copy_until(from, to, dir, traffic, COPY_CHUNK, |_| true).await? {
            return Ok(()); // EOF
        }
    }
    let mut cut = false;
    for _ in 0..CUT_THROUGH_ATTEMPTS {
        // Everything read from `from` has been written to `to` and counted.
        let received = traffic.count(dir);
        match connredir::cut_through_to(from, to_ends.local, to_ends.peer, received) {
            Ok(()) => {
                traffic.cut(dir);
                cut = true;
                break;
            }
            Err(connredir::CutThroughError::InFlight) => {
                // Forward one more read (or find EOF), then ask again.
                if copy_until(from, to, dir, traffic, COPY_CHUNK, |_| true).await? {
                    return Ok(());
                }
            }
            Err(e) => {
                debug!(error = %e, ?dir, "no cut-through: relaying in the proxy");
                break;
            }
        }
    }
    // After a cut-through only EOF (or an error) comes; a byte would mean
    // the layer broke its promise, and is still forwarded.
    let before = traffic.count(dir);
    copy_all(from, to, dir, traffic).await?;
    if cut {
        if traffic.count(dir) != before {
            warn!(?dir, "bytes arrived after the cut-through");
        }
        // The layer counted every byte of the direction, ours and its own.
        if let Ok(total) = connredir::bytes_written_into(from) {
            traffic.saw_total(dir, total);
        }
    }
    Ok(())
}

/// Zero-copy through a pipe: fill it from `from`, drain it into `to`, and
/// only then read again, so at most one pipe of data is in flight.
async fn splice_all(
    from: &TcpStream,
    to: &TcpStream,
    dir: Direction,
    traffic: &Traffic,
) -> io::Result<()> {
    let (pipe_out, pipe_in) = io::pipe()?;
    // `async_io` waits for readiness, runs the call, and on EAGAIN clears
    // the readiness and waits again.
    loop {
        let filled = from
            .async_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe_in.as_raw_fd(), CHUNK)
            })
            .await?;
        if filled == 0 {
            return Ok(()); // EOF
        }
        let mut left = filled;
        while left > 0 {
            let n = to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe_out.as_raw_fd(), to.as_raw_fd(), left)
                })
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            traffic.moved(dir, n);
            traffic.spliced.fetch_add(n as u64, Ordering::Relaxed);
            left -= n;
        }
    }
}

/// One non-blocking `splice(2)` call.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: both descriptors stay open for the call (borrowed from live
    // owners); null offsets mean "current position", as pipes and sockets need.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// The plain relay, both ways without inspection: what the handler
    /// does once inspection is over.
    async fn relay(
        client: &TcpStream,
        server: &TcpStream,
        mode: Mode,
        idle: Duration,
        traffic: &Traffic,
    ) -> Result<(), RelayError> {
        let up = pump(client, server, mode, Direction::Up, traffic);
        let down = pump(server, client, mode, Direction::Down, traffic);
        supervise(up, down, idle, traffic, [client, server]).await
    }

    /// A connected pair on 127.0.0.1: (the outside end, the proxy's end).
    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outside = TcpStream::connect(listener.local_addr().unwrap());
        let (outside, inside) = tokio::join!(outside, listener.accept());
        (outside.unwrap(), inside.unwrap().0)
    }

    /// Client and server ends of a relay running in a task; the task
    /// returns the result and the byte counts.
    async fn relayed(
        mode: Mode,
        idle: Duration,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<(Result<(), RelayError>, u64, u64, u64)>,
    ) {
        let (client, client_in) = pair().await;
        let (server, server_in) = pair().await;
        let task = tokio::spawn(async move {
            let traffic = Traffic::default();
            let done = relay(&client_in, &server_in, mode, idle, &traffic).await;
            (done, traffic.up(), traffic.down(), traffic.spliced())
        });
        (client, server, task)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Sends `data` and then EOF on `stream`, while reading all it gets.
    async fn exchange(stream: TcpStream, data: Vec<u8>) -> Vec<u8> {
        let (mut read, mut write) = stream.into_split();
        let writer = tokio::spawn(async move {
            write.write_all(&data).await.unwrap();
            write.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        read.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        got
    }

    /// Relays `up_len` bytes up and `down_len` down in `mode`, checks both
    /// arrive byte for byte and the relay ends well, and returns its
    /// (up, down, spliced) counts.
    async fn round_trip(mode: Mode, up_len: usize, down_len: usize) -> (u64, u64, u64) {
        let (client, server, task) = relayed(mode, Duration::from_secs(30)).await;
        let (up, down) = (pattern(up_len, 0x5a), pattern(down_len, 0xa5));
        let (at_server, at_client) =
            tokio::join!(exchange(server, down.clone()), exchange(client, up.clone()));
        assert!(at_server == up, "{mode:?} {up_len}: upload differs");
        assert!(at_client == down, "{mode:?} {down_len}: download differs");
        let (done, up_count, down_count, spliced) = task.await.unwrap();
        done.unwrap();
        (up_count, down_count, spliced)
    }

    #[tokio::test]
    async fn moves_bytes_exactly_both_ways() {
        for mode in [Mode::Splice, Mode::Copy] {
            for len in [0, 1, 5 << 20] {
                let (up_count, down_count, _) = round_trip(mode, len, len).await;
                assert_eq!((up_count, down_count), (len as u64, len as u64));
            }
        }
    }

    #[tokio::test]
    async fn splice_mode_copies_small_flows_and_splices_bulk_ones() {
        let small = 700;
        // Sizes around the switch, and far past it.
        for len in [
            small,
            FIRST_BUFFER - 1,
            SPLICE_AFTER as usize + 1,
            3 * SPLICE_AFTER as usize + 12_345,
            5 << 20,
        ] {
            let (up_count, down_count, spliced) = round_trip(Mode::Splice, len, small).await;
            assert_eq!((up_count, down_count), (len as u64, small as u64));
            if len <= FIRST_BUFFER {
                assert_eq!(spliced, 0, "{len}: a short flow went through a pipe");
            }
            if len >= 2 * SPLICE_AFTER as usize {
                assert!(
                    spliced >= len as u64 - SPLICE_AFTER - FIRST_BUFFER as u64,
                    "{len}: only {spliced} bytes spliced"
                );
            }
        }
        // Copy mode never splices.
        let (client, server, task) = relayed(Mode::Copy, Duration::from_secs(30)).await;
        let data = pattern(1 << 20, 1);
        let (at_server, _) =
            tokio::join!(exchange(server, Vec::new()), exchange(client, data.clone()));
        assert!(at_server == data);
        assert_eq!(task.await.unwrap().3, 0);
    }

    #[tokio::test]
    async fn half_close_keeps_the_other_direction() {
        for mode in [Mode::Splice, Mode::Copy] {
            let (mut client, mut server, task) = relayed(mode, Duration::from_secs(30)).await;
            client.write_all(b"question").await.unwrap();
            client.shutdown().await.unwrap();
            let mut asked = Vec::new();
            server.read_to_end(&mut asked).await.unwrap();
            assert_eq!(asked, b"question");
            // The server answers after the client's EOF.
            server.write_all(b"answer").await.unwrap();
            drop(server);
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer, b"answer", "{mode:?}");
            assert!(task.await.unwrap().0.is_ok());
        }
    }

    #[tokio::test]
    async fn idle_timeout_ends_the_relay() {
        for mode in [Mode::Splice, Mode::Copy] {
            let (mut client, _server, task) = relayed(mode, Duration::from_millis(200)).await;
            let started = Instant::now();
            let (done, ..) = task.await.unwrap();
            assert!(matches!(done, Err(RelayError::Idle(_))), "{done:?}");
            assert!(started.elapsed() < Duration::from_secs(2));
            // The relay dropped its ends: the client sees the close.
            let mut rest = Vec::new();
            let _ = client.read_to_end(&mut rest).await;
        }
    }

    #[tokio::test]
    async fn a_reset_does_not_hang_the_other_side() {
        for mode in [Mode::Splice, Mode::Copy] {
            let (mut client, server, task) = relayed(mode, Duration::from_secs(30)).await;
            server.set_zero_linger().unwrap();
            drop(server); // RST
            let (done, ..) = tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("the relay ends")
                .unwrap();
            assert!(
                matches!(done, Err(RelayError::Down(_))),
                "{mode:?}: {done:?}"
            );
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest));
            assert!(read.await.is_ok(), "the client is not left hanging");
        }
    }
}
