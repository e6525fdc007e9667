//! HTTP/1.1 over plain TCP, what a vLLM server at an `http://` address speaks: a request
//! written with one `writev`, the answer's head parsed with `httparse`, its body read as
//! it comes (a length, chunks, or until the server closes) straight from the socket by
//! the task that reads the answer, and the connection pooled again when the body is whole.
//!
//! Why not hyper's client here (it still serves `https://`, where ALPN may choose HTTP/2):
//! every open stream holds one such connection, and hyper's holds a task, a dispatch
//! channel's block of 32 request slots and an 8 KiB write buffer for the connection's whole
//! life (BENCHMARKS.md, point 12). Here an open stream holds its socket, the state below and
//! no buffer while it waits: 10,000 open streams are the budget of issue 21.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::uri::Authority;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The largest answer head (status line and headers) read; vLLM's are a few hundred bytes.
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Headers an answer may have.
const MAX_HEADERS: usize = 100;

/// Unused connections kept per model server; more are closed, oldest first. Ten thousand
/// streams that end together do not leave ten thousand sockets open (a server closes its
/// side of them after its own idle timeout, and a closed one is found only when taken).
const MAX_IDLE_PER_HOST: usize = 256;
/// A pooled connection idle this long is checked with the kernel before reuse (see
/// `still_open`).
const ASK_KERNEL_AFTER: Duration = Duration::from_secs(1);

/// The first read of an answer; reads that fill their room double it, up to [`MAX_READ`].
const FIRST_READ: usize = 4096;
const MAX_READ: usize = 64 * 1024;

/// The longest chunk-size or trailer line.
const MAX_LINE: usize = 4096;

/// A failure to send a request or to read its answer.
#[derive(Debug)]
pub(super) enum H1Error {
    /// No connection could be made (refused, unreachable, timed out).
    Connect(io::Error),
    Io(io::Error),
    /// The server closed the connection before the answer's head was whole.
    ClosedBeforeAnswer,
    HeadTooLarge,
    Malformed(String),
    /// The server closed the connection before the body was whole.
    ClosedInBody,
}

impl H1Error {
    pub(super) fn is_connect(&self) -> bool {
        matches!(self, H1Error::Connect(_))
    }
}

impl std::fmt::Display for H1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H1Error::Connect(_) => f.write_str("cannot connect"),
            H1Error::Io(_) => f.write_str("connection error"),
            H1Error::ClosedBeforeAnswer => {
                f.write_str("the connection closed before the answer began")
            }
            H1Error::HeadTooLarge => write!(f, "the answer's head is over {MAX_HEAD_BYTES} bytes"),
            H1Error::Malformed(what) => write!(f, "the answer is not valid HTTP/1.1: {what}"),
            H1Error::ClosedInBody => {
                f.write_str("the connection closed before the answer's body was whole")
            }
        }
    }
}

impl std::error::Error for H1Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            H1Error::Connect(e) | H1Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

fn malformed(what: impl Into<String>) -> H1Error {
    H1Error::Malformed(what.into())
}

/// Pooled HTTP/1.1 connections, per host and port; cheap to clone.
#[derive(Clone)]
pub(super) struct H1Client {
    pool: Arc<Pool>,
    connect_timeout: Duration,
}

#[derive(Debug)]
struct Pool {
    /// Keyed by the authority's text as its backend's URL spells it (a backend always
    /// spells it the same way), hashed with FNV (the text is the configuration's):
    /// `Authority`'s own hash lowercases and hashes it byte by byte, about a thousand
    /// instructions a call.
    idle: Mutex<HashMap<Box<str>, VecDeque<Idle>, fnv::FnvBuildHasher>>,
    idle_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    io: TcpStream,
    since: Instant,
}

impl Pool {
    /// The most recently pooled connection to `to` that is still open. Closed ones are
    /// dropped (their `close`) outside the lock.
    fn take(&self, to: &Authority) -> Option<TcpStream> {
        loop {
            let (conn, idle_for) = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                let list = idle.get_mut(to.as_str())?;
                let conn = list.pop_back()?;
                let idle_for = conn.since.elapsed();
                if idle_for >= self.idle_timeout {
                    // The rest were pooled earlier still.
                    let expired = std::mem::take(list);
                    drop(idle);
                    drop(expired);
                    return None;
                }
                (conn, idle_for)
            };
            if still_open(&conn.io, idle_for) {
                return Some(conn.io);
            }
        }
    }

    /// Pools `io`, past the idle timeout's and [`MAX_IDLE_PER_HOST`]'s oldest.
    fn put(&self, to: Authority, io: TcpStream) {
        let now = Instant::now();
        let mut gone = Vec::new();
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let conn = Idle { io, since: now };
            // Looked up by the text, so that only a host's first connection makes its key.
            let Some(list) = idle.get_mut(to.as_str()) else {
                idle.insert(to.as_str().into(), VecDeque::from([conn]));
                return;
            };
            while let Some(oldest) = list.front() {
                if list.len() < MAX_IDLE_PER_HOST
                    && now.duration_since(oldest.since) < self.idle_timeout
                {
                    break;
                }
                gone.extend(list.pop_front());
            }
            list.push_back(conn);
        }
        drop(gone);
    }
}

/// Whether a pooled connection is still open: the server has neither closed it (an idle
/// keep-alive timeout: vLLM's is 5 s) nor sent anything unasked.
///
/// One pooled within [`ASK_KERNEL_AFTER`] is judged by what the runtime has seen of it: no
/// system call, since the read that ended its last body marked it drained, and a close
/// since then has made it readable. One idle for longer is asked of the kernel, which knows
/// of a close the runtime may not have polled yet (a busy runtime polls its sockets between
/// tasks).
fn still_open(io: &TcpStream, idle: Duration) -> bool {
    let unread = if idle < ASK_KERNEL_AFTER {
        io.try_read(&mut [0u8; 1])
    } else {
        socket2::SockRef::from(io).peek(&mut [std::mem::MaybeUninit::uninit(); 1])
    };
    matches!(unread, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl H1Client {
    pub(super) fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        H1Client {
            pool: Arc::new(Pool {
                idle: Mutex::new(HashMap::default()),
                idle_timeout,
            }),
            connect_timeout,
        }
    }

    /// Sends `request` to its URL's host and port and waits for the answer's head. A
    /// pooled connection that the server had reset before the request could be written is
    /// replaced by a new one, once: the server read none of it. A request written and then
    /// left unanswered is not sent again: the model may be working on it.
    pub(super) async fn send(&self, request: Request<Bytes>) -> Result<Response<H1Body>, H1Error> {
        let (parts, body) = request.into_parts();
        let to = parts
            .uri
            .authority()
            .cloned()
            .ok_or_else(|| malformed("the request's URL has no host"))?;
        let head = request_head(&parts, &to, body.len());
        let head_only = parts.method == Method::HEAD;
        if let Some(mut io) = self.pool.take(&to)
            && write_all(&mut io, &head, &body).await.is_ok()
        {
            return self.answer(io, head_only, to).await;
        }
        let mut io = self.connect(&to).await?;
        write_all(&mut io, &head, &body)
            .await
            .map_err(H1Error::Io)?;
        self.answer(io, head_only, to).await
    }

    async fn connect(&self, to: &Authority) -> Result<TcpStream, H1Error> {
        // An IPv6 literal comes in brackets.
        let host = to.host().trim_start_matches('[').trim_end_matches(']');
        let port = to.port_u16().unwrap_or(80);
        let io = match tokio::time::timeout(self.connect_timeout, TcpStream::connect((host, port)))
            .await
        {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(H1Error::Connect(e)),
            Err(_) => {
                return Err(H1Error::Connect(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connect timed out",
                )));
            }
        };
        io.set_nodelay(true).map_err(H1Error::Connect)?;
        Ok(io)
    }

    /// Reads the answer's head (passing over `1xx` heads) on `io`, where the request was
    /// written; its body is read from the same buffer.
    async fn answer(
        &self,
        io: TcpStream,
        head_only: bool,
        to: Authority,
    ) -> Result<Response<H1Body>, H1Error> {
        let mut body = H1Body {
            io: Some(io),
            buf: BytesMut::new(),
            framing: Framing::Done,
            next_read: FIRST_READ,
            pool: None,
        };
        let response = loop {
            if !body.buf.is_empty() {
                match parse_head(&mut body.buf)? {
                    Some(response) if response.status().is_informational() => continue,
                    Some(response) => break response,
                    None if body.buf.len() >= MAX_HEAD_BYTES => {
                        return Err(H1Error::HeadTooLarge);
                    }
                    None => {}
                }
            }
            match std::future::poll_fn(|cx| body.poll_read(cx)).await {
                Ok(0) => return Err(H1Error::ClosedBeforeAnswer),
                Ok(_) => {}
                Err(e) => return Err(H1Error::Io(e)),
            }
        };
        body.framing = framing(&response, head_only)?;
        // Both framings named is what request smuggling looks like (RFC 9112, 6.3): read
        // by the chunks, and the connection not trusted again.
        let both_framings = response.headers().contains_key(TRANSFER_ENCODING)
            && response.headers().contains_key(CONTENT_LENGTH);
        let reusable = response.version() == Version::HTTP_11
            && !has_token(response.headers(), &CONNECTION, "close")
            && !matches!(body.framing, Framing::UntilClose)
            && !both_framings;
        body.pool = reusable.then(|| (Arc::clone(&self.pool), to));
        body.release_if_empty();
        Ok(response.map(|()| body))
    }
}

/// The request line and headers; `host` and `content-length` added unless present.
fn request_head(parts: &http::request::Parts, to: &Authority, body_len: usize) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(HOST) {
        // Host and port only: an authority's user info never goes in `host`.
        head.extend_from_slice(b"host: ");
        head.extend_from_slice(to.host().as_bytes());
        if let Some(port) = to.port() {
            head.push(b':');
            head.extend_from_slice(port.as_str().as_bytes());
        }
        head.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let sends_body =
        body_len > 0 || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
    if sends_body && !parts.headers.contains_key(CONTENT_LENGTH) {
        head.extend_from_slice(b"content-length: ");
        head.extend_from_slice(body_len.to_string().as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

async fn write_all(io: &mut TcpStream, head: &[u8], body: &[u8]) -> io::Result<()> {
    let mut slices = [IoSlice::new(head), IoSlice::new(body)];
    let mut left: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut left, 0);
    while !left.is_empty() {
        let n = io.write_vectored(left).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut left, n);
    }
    Ok(())
}

/// The head at the start of `buf`, taken out of it, or `None` if it is not whole yet.
/// Header values are slices of the bytes read, not copies.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Response<()>>, H1Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(malformed(e.to_string())),
    };
    let status = StatusCode::from_u16(parsed.code.unwrap_or(0))
        .map_err(|_| malformed("the status code is out of range"))?;
    let version = if parsed.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let start = buf.as_ptr() as usize;
    let mut names = Vec::with_capacity(parsed.headers.len());
    for header in parsed.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|_| malformed(format!("bad header name {:?}", header.name)))?;
        let at = header.value.as_ptr() as usize - start;
        names.push((name, at..at + header.value.len()));
    }
    let head = buf.split_to(len).freeze();
    let mut map = HeaderMap::with_capacity(names.len());
    for (name, range) in names {
        let value = HeaderValue::from_maybe_shared(head.slice(range))
            .map_err(|_| malformed(format!("bad value of header {name}")))?;
        map.append(name, value);
    }
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = map;
    Ok(Some(response))
}

/// Whether a comma-separated header has `token` (case-insensitive) in any of its values.
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// How an answer's body ends (RFC 9112, section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// Whatever comes until the server closes.
    UntilClose,
    Done,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    /// This many bytes of the chunk are left.
    Data(u64),
    /// The line end after a chunk's data.
    DataEnd,
    Trailers,
}

fn framing(response: &Response<()>, head_only: bool) -> Result<Framing, H1Error> {
    let status = response.status();
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Length(0));
    }
    let headers = response.headers();
    if headers.contains_key(TRANSFER_ENCODING) {
        let chunked = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        return Ok(if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::UntilClose
        });
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        let digits = value.as_bytes().trim_ascii();
        let n: u64 = (!digits.is_empty() && digits.iter().all(u8::is_ascii_digit))
            .then(|| std::str::from_utf8(digits).ok()?.parse().ok())
            .flatten()
            .ok_or_else(|| malformed("bad content-length"))?;
        if length.is_some_and(|l| l != n) {
            return Err(malformed("two different content-lengths"));
        }
        length = Some(n);
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

/// An answer's body, read from the socket as the reader polls it. Whole, its connection
/// goes back to the pool; dropped before, the connection is closed (which tells vLLM to
/// stop generating).
#[derive(Debug)]
pub(super) struct H1Body {
    io: Option<TcpStream>,
    /// Bytes read and not handed out yet; no allocation while it is empty.
    buf: BytesMut,
    framing: Framing,
    next_read: usize,
    /// Where the connection goes back when the body is whole; `None`: closed then.
    pool: Option<(Arc<Pool>, Authority)>,
}

impl H1Body {
    /// An empty buffer gives its room back: a stream waiting for its next token holds
    /// none (the bytes handed out keep their allocation alive on their own).
    fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    fn take(&mut self, n: usize) -> Frame<Bytes> {
        let data = self.buf.split_to(n).freeze();
        self.release_if_empty();
        Frame::data(data)
    }

    /// The body is whole: the connection is pooled when it may be reused and nothing
    /// beyond the body arrived.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        let io = self.io.take();
        if let (Some(io), Some((pool, to))) = (io, self.pool.take())
            && self.buf.is_empty()
        {
            pool.put(to, io);
        }
        self.buf = BytesMut::new();
    }

    fn fail(&mut self, error: H1Error) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.framing = Framing::Done;
        self.io = None;
        self.pool = None;
        self.buf = BytesMut::new();
        Poll::Ready(Some(Err(error)))
    }

    /// Reads more bytes into the buffer; `Ok(0)` when the server closed. Room is made
    /// only once the socket has bytes.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(io) = &mut self.io else {
            return Poll::Ready(Ok(0));
        };
        ready!(io.poll_read_ready(cx))?;
        let room = self.next_read;
        self.buf.reserve(room);
        // Read as `AsyncRead`, which marks the socket drained when a read leaves room in
        // the buffer (`try_read` would not): the check of a pooled connection before its
        // next call then makes no system call (one fewer `recv` a call).
        match tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut self.buf) {
            Poll::Pending => {
                // A stream that waits holds only what it has not handed out (a part of a
                // line, say), not the room made for the read.
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                } else if self.buf.capacity() > 2 * self.buf.len() + FIRST_READ {
                    self.buf = BytesMut::from(&self.buf[..]);
                }
                Poll::Pending
            }
            Poll::Ready(Ok(n)) => {
                // Larger reads while they fill their room, back to the first size when
                // one does not.
                self.next_read = if n >= room {
                    (room * 2).min(MAX_READ)
                } else {
                    FIRST_READ
                };
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }

    /// The next line (without its line end) taken out of the buffer, if one is whole.
    fn take_line(&mut self) -> Result<Option<Bytes>, H1Error> {
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let mut line = self.buf.split_to(end + 1).freeze();
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                self.release_if_empty();
                Ok(Some(line))
            }
            None if self.buf.len() > MAX_LINE => Err(malformed("a chunk line is too long")),
            None => Ok(None),
        }
    }
}

/// A chunk-size line: hex digits, then maybe `;extensions`.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let first = digits
        .iter()
        .position(|&b| b != b'0')
        .unwrap_or(digits.len());
    let significant = &digits[first..];
    if significant.len() > 15 {
        return None;
    }
    if significant.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(significant).ok()?, 16).ok()
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        loop {
            let need_more = match this.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) | Framing::Chunked(Chunk::Data(left)) => {
                    if this.buf.is_empty() {
                        true
                    } else {
                        let n = usize::try_from(left)
                            .unwrap_or(usize::MAX)
                            .min(this.buf.len());
                        let left = left - n as u64;
                        this.framing = match this.framing {
                            Framing::Length(_) => Framing::Length(left),
                            _ if left == 0 => Framing::Chunked(Chunk::DataEnd),
                            _ => Framing::Chunked(Chunk::Data(left)),
                        };
                        return Poll::Ready(Some(Ok(this.take(n))));
                    }
                }
                Framing::UntilClose => {
                    if this.buf.is_empty() {
                        true
                    } else {
                        let n = this.buf.len();
                        return Poll::Ready(Some(Ok(this.take(n))));
                    }
                }
                Framing::Chunked(at) => match this.take_line() {
                    Err(e) => return this.fail(e),
                    Ok(None) => true,
                    Ok(Some(line)) => {
                        this.framing = match at {
                            Chunk::Size => match chunk_size(&line) {
                                Some(0) => Framing::Chunked(Chunk::Trailers),
                                Some(n) => Framing::Chunked(Chunk::Data(n)),
                                None => return this.fail(malformed("bad chunk size")),
                            },
                            Chunk::DataEnd if line.is_empty() => Framing::Chunked(Chunk::Size),
                            Chunk::DataEnd => {
                                return this.fail(malformed("a chunk is longer than its size"));
                            }
                            // Trailers carry nothing the gateway reads; an empty line ends them.
                            Chunk::Trailers if line.is_empty() => {
                                this.finish();
                                return Poll::Ready(None);
                            }
                            Chunk::Trailers | Chunk::Data(_) => this.framing,
                        };
                        false
                    }
                },
            };
            if need_more {
                match ready!(this.poll_read(cx)) {
                    Ok(0) if this.framing == Framing::UntilClose => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(0) => return this.fail(H1Error::ClosedInBody),
                    Ok(_) => {}
                    Err(e) => return this.fail(H1Error::Io(e)),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
