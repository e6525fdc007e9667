//! Image inputs at the gateway edge: header-only size sniffing, `data:` URL inspection, the
//! SSRF policy for image URLs the model server will fetch, and the prompt-token estimate for
//! an image.
//!
//! Everything here runs on untrusted request bodies before they reach the GPU server, so every
//! parser reads through bounds-checked accessors, does at most linear work in its input, and
//! answers "unknown" (`None`) or a typed error instead of panicking.
//!
//! This module depends on nothing else in the gateway (only `base64`, `url`, `serde` and
//! `thiserror`) so it can be tested, fuzzed and reviewed on its own.

// Hostile input must never take the gateway down: outside tests, no panicking shortcuts.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use url::{Host, Url};

// ---------------------------------------------------------------------------------------------
// Image size sniffing
// ---------------------------------------------------------------------------------------------

/// Width and height in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
}

/// Reads an image's size from the first bytes of its encoding without decoding pixels:
/// PNG (`IHDR`), GIF (logical screen), WebP (`VP8`, `VP8L`, `VP8X`), JPEG (walk the markers to
/// the first `SOFn`, skipping `APPn`/EXIF and other segments by their lengths), BMP.
///
/// Returns `None` for any other format, for truncated or corrupt input, and for a zero width or
/// height (such a header is either corrupt or defers the size to later data, e.g. a JPEG DNL
/// marker, so "unknown" is the honest answer). Never panics, never reads past the slice, and does
/// at most O(`bytes.len()`) work.
///
/// EXIF orientation is deliberately ignored: a 90° rotation swaps width and height, which does
/// not change the token estimate this size feeds.
#[must_use]
pub fn image_size(bytes: &[u8]) -> Option<ImageSize> {
    // Hand-written rather than the `imagesize` crate, because imagesize 0.15.0 (the latest release)
    // got some of our test vectors wrong. It read a top-down BMP (negative height) as 4294966816
    // rows tall. It kept the VP8 upscaling bits in the size, so a lossy WebP with them set came out
    // 16384 px or more too wide. It did not read the OS/2 BMP core header. It returned nothing for
    // JPEGs with fill bytes (the spec allows them) or with stray bytes or RSTn markers before the
    // frame header (libjpeg skips them). It accepted headers we refuse: PNG without IHDR first, VP8
    // inter-frames, a BMP DIB size it does not know. It was just as linear on hostile JPEGs, did
    // not panic under our proptests, and cost tens of ns either way, so speed decides nothing. It
    // also reads formats we do not (TIFF, HEIF/AVIF, ICO, …). Those are sizes we call "unknown"
    // today, not a reason to swap parsers. Check again when a new version comes out.
    if bytes.starts_with(PNG_SIGNATURE) {
        png_size(bytes)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        gif_size(bytes)
    } else if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP".as_slice()) {
        webp_size(bytes)
    } else if bytes.starts_with(&[0xFF, 0xD8]) {
        jpeg_size(bytes)
    } else if bytes.starts_with(b"BM") {
        bmp_size(bytes)
    } else {
        None
    }
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// The media type of an image encoding [`image_size`] reads, from its magic bytes alone
/// (`image/png`, `image/gif`, `image/webp`, `image/jpeg`, `image/bmp`); `None` for anything
/// else.
#[must_use]
pub fn image_media_type(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(PNG_SIGNATURE) {
        Some("image/png")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP".as_slice()) {
        Some("image/webp")
    } else if bytes.starts_with(&[0xFF, 0xD8]) {
        Some("image/jpeg")
    } else if bytes.starts_with(b"BM") {
        Some("image/bmp")
    } else {
        None
    }
}

/// Builds a size, refusing zero dimensions (see [`image_size`]).
fn nonzero_size(width: u32, height: u32) -> Option<ImageSize> {
    (width > 0 && height > 0).then_some(ImageSize { width, height })
}

/// `N` bytes at `at`, or `None` if the slice is too short (or `at + N` overflows).
fn array_at<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    let end = at.checked_add(N)?;
    bytes.get(at..end)?.try_into().ok()
}

fn be_u16(bytes: &[u8], at: usize) -> Option<u16> {
    array_at(bytes, at).map(u16::from_be_bytes)
}

fn le_u16(bytes: &[u8], at: usize) -> Option<u16> {
    array_at(bytes, at).map(u16::from_le_bytes)
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    array_at(bytes, at).map(u32::from_be_bytes)
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    array_at(bytes, at).map(u32::from_le_bytes)
}

fn le_i32(bytes: &[u8], at: usize) -> Option<i32> {
    array_at(bytes, at).map(i32::from_le_bytes)
}

/// 24-bit little-endian, as used by the WebP VP8X canvas fields.
fn le_u24(bytes: &[u8], at: usize) -> Option<u32> {
    array_at::<3>(bytes, at).map(|[a, b, c]| u32::from_le_bytes([a, b, c, 0]))
}

/// PNG: the first chunk must be IHDR (signature, 4-byte length, "IHDR", width, height).
fn png_size(bytes: &[u8]) -> Option<ImageSize> {
    if bytes.get(12..16) != Some(b"IHDR".as_slice()) {
        return None;
    }
    let width = be_u32(bytes, 16)?;
    let height = be_u32(bytes, 20)?;
    // The PNG spec caps both dimensions at 2^31 - 1; anything above is a corrupt header.
    const PNG_MAX_DIMENSION: u32 = 0x7FFF_FFFF;
    if width > PNG_MAX_DIMENSION || height > PNG_MAX_DIMENSION {
        return None;
    }
    nonzero_size(width, height)
}

/// GIF: the logical screen descriptor follows the 6-byte signature.
fn gif_size(bytes: &[u8]) -> Option<ImageSize> {
    let width = le_u16(bytes, 6)?;
    let height = le_u16(bytes, 8)?;
    nonzero_size(width.into(), height.into())
}

/// WebP: a RIFF container whose first chunk (at offset 12) is VP8, VP8L or VP8X.
fn webp_size(bytes: &[u8]) -> Option<ImageSize> {
    // Chunk payloads start at offset 20, after the fourcc (12..16) and chunk size (16..20).
    const DATA: usize = 20;
    match bytes.get(12..16)? {
        b"VP8 " => {
            // Lossy: 3-byte frame tag (bit 0 clear on key frames, which carry the size), the
            // start code 9D 01 2A, then 14-bit width/height (the top 2 bits are upscaling hints).
            let frame_tag = *bytes.get(DATA)?;
            if frame_tag & 1 != 0 || bytes.get(DATA + 3..DATA + 6)? != [0x9D, 0x01, 0x2A] {
                return None;
            }
            let width = le_u16(bytes, DATA + 6)? & 0x3FFF;
            let height = le_u16(bytes, DATA + 8)? & 0x3FFF;
            nonzero_size(width.into(), height.into())
        }
        b"VP8L" => {
            // Lossless: signature byte 0x2F, then 14 bits width-1, 14 bits height-1, 1 bit alpha
            // hint and a 3-bit version that must be 0.
            if *bytes.get(DATA)? != 0x2F {
                return None;
            }
            let bits = le_u32(bytes, DATA + 1)?;
            if bits >> 29 != 0 {
                return None;
            }
            nonzero_size((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        }
        b"VP8X" => {
            // Extended: 1 byte flags, 3 reserved, then 24-bit canvas width-1 and height-1.
            let width = le_u24(bytes, DATA + 4)? + 1;
            let height = le_u24(bytes, DATA + 7)? + 1;
            nonzero_size(width, height)
        }
        _ => None,
    }
}

/// JPEG: walk the marker segments after SOI until the first start-of-frame (`SOFn`).
///
/// Every step moves `at` forward by at least one byte and segments are skipped by their declared
/// lengths (never by scanning their contents), so a hostile file costs at most O(len).
fn jpeg_size(bytes: &[u8]) -> Option<ImageSize> {
    let mut at: usize = 2; // past SOI (FF D8)
    loop {
        // Like libjpeg, tolerate stray bytes between segments: skip to the next 0xFF.
        while *bytes.get(at)? != 0xFF {
            at = at.checked_add(1)?;
        }
        // Any number of 0xFF fill bytes may precede a marker code.
        while *bytes.get(at)? == 0xFF {
            at = at.checked_add(1)?;
        }
        let marker = *bytes.get(at)?;
        at = at.checked_add(1)?;
        match marker {
            // FF 00 is a stuffed data byte, not a marker; TEM, RSTn and a repeated SOI stand
            // alone without a length field.
            0x00 | 0x01 | 0xD0..=0xD8 => {}
            // End of image, or scan data before any frame header: there is no size to find.
            0xD9 | 0xDA => return None,
            // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC), which share the range.
            0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                // Length (2), sample precision (1), height (2), width (2).
                let length = be_u16(bytes, at)?;
                if length < 8 {
                    return None;
                }
                let height = be_u16(bytes, at.checked_add(3)?)?;
                let width = be_u16(bytes, at.checked_add(5)?)?;
                // Height 0 means "defined later by a DNL marker": treat as unknown.
                return nonzero_size(width.into(), height.into());
            }
            _ => {
                // APPn (EXIF, ICC, XMP…), DQT, DHT, COM…: the length counts its own two bytes.
                let length = be_u16(bytes, at)?;
                if length < 2 {
                    return None;
                }
                at = at.checked_add(usize::from(length))?;
            }
        }
    }
}

/// BMP: "BM", a 14-byte file header, then a DIB header whose size tells its layout.
fn bmp_size(bytes: &[u8]) -> Option<ImageSize> {
    match le_u32(bytes, 14)? {
        // BITMAPCOREHEADER: unsigned 16-bit dimensions.
        12 => nonzero_size(le_u16(bytes, 18)?.into(), le_u16(bytes, 20)?.into()),
        // OS/2 v2 and BITMAPINFOHEADER..V5: signed 32-bit, a negative height means top-down.
        16 | 40 | 52 | 56 | 64 | 108 | 124 => {
            let width = le_i32(bytes, 18)?;
            let height = le_i32(bytes, 22)?;
            if width <= 0 {
                return None;
            }
            nonzero_size(width.unsigned_abs(), height.unsigned_abs())
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// data: URLs
// ---------------------------------------------------------------------------------------------

/// What a `data:` URL holds: its media type and (if the header could be read) the size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataImage {
    /// The declared media type, lowercased and without parameters, e.g. `image/png`.
    pub mime_type: String,
    /// The size sniffed from the start of the payload, if it is base64 and a known format.
    pub size: Option<ImageSize>,
    /// Length in bytes of the payload text after the comma, as sent (still encoded). Decoded
    /// base64 is about three quarters of this.
    pub encoded_len: usize,
}

/// At most this much base64 text is decoded to sniff a size: 512 KiB of text is 384 KiB of
/// image, far more than any header needs (even a JPEG with several 64 KiB `APPn` segments), while
/// a 20 MB upload still costs almost nothing. A multiple of 4, so it cuts on a quantum boundary.
const DATA_URL_SNIFF_CHARS: usize = 512 * 1024;

/// The header (`image/png;base64`) must end within this many bytes: real ones are a few dozen,
/// and a bound keeps the search for its comma cheap on a comma-less multi-megabyte string.
const DATA_URL_MAX_HEADER: usize = 1024;

/// RFC 6838 allows 127 characters each for type and subtype.
const MAX_MIME_LEN: usize = 255;

/// Decodes the collected prefix: no `=` reaches it (padding ends the scan) and the last quantum
/// may be partial, so padding is optional and non-zero trailing bits are tolerated.
const SNIFF_ENGINE: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Parses `data:<mime>[;params][;base64],<payload>` and reads the image size from a decoded
/// prefix of the payload only.
///
/// At most the first 512 KiB of base64 text is looked at; ASCII whitespace in it is skipped,
/// percent-escapes are decoded, the URL-safe alphabet is accepted, and decoding stops at the first
/// `=` or invalid character (what follows, within or beyond the prefix, is ignored). A payload
/// shorter than the prefix is decoded whole, including a final partial quantum. Non-base64 data
/// URLs get their media type but no size.
///
/// # Errors
///
/// [`ImagePolicyError::Malformed`] if `url` is not a data URL, has no comma within its first
/// 1 KiB, or declares a media type that is not `image/*`.
pub fn read_data_url(url: &str) -> Result<DataImage, ImagePolicyError> {
    let is_data = url
        .as_bytes()
        .get(..5)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"data:"));
    let rest = match url.get(5..) {
        Some(rest) if is_data => rest,
        _ => return Err(malformed("expected a `data:` URL")),
    };
    let comma = rest
        .bytes()
        .take(DATA_URL_MAX_HEADER)
        .position(|b| b == b',')
        .ok_or_else(|| malformed("the data URL has no `,` between its media type and its data"))?;
    // `comma` indexes an ASCII byte, so both slices below fall on char boundaries.
    let (Some(header), Some(payload)) = (rest.get(..comma), rest.get(comma + 1..)) else {
        return Err(malformed("the data URL could not be split at its `,`"));
    };

    let mut parts = header.split(';');
    let mime_type = parts
        .next()
        .unwrap_or_default()
        .trim_matches(|c: char| c.is_ascii_whitespace())
        .to_ascii_lowercase();
    if !is_image_mime(&mime_type) {
        // An empty media type means text/plain (RFC 2397); say so rather than echo nothing.
        let shown = if mime_type.is_empty() {
            "text/plain"
        } else {
            mime_type.as_str()
        };
        return Err(malformed(&format!(
            "data URL media type `{}` is not an image type (expected image/*)",
            clip(shown)
        )));
    }
    let is_base64 = parts
        .next_back()
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("base64"));

    let size = if is_base64 {
        image_size(&decode_base64_prefix(payload.as_bytes()))
    } else {
        None
    };
    Ok(DataImage {
        mime_type,
        size,
        encoded_len: payload.len(),
    })
}

/// `image/<subtype>` where both halves are RFC 6838 restricted names.
fn is_image_mime(mime: &str) -> bool {
    let Some(subtype) = mime.strip_prefix("image/") else {
        return false;
    };
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || "!#$&-^_.+".contains(c);
    mime.len() <= MAX_MIME_LEN && !subtype.is_empty() && subtype.chars().all(is_name_char)
}

/// Decodes the start of a base64 payload (see [`read_data_url`] for what is tolerated).
fn decode_base64_prefix(payload: &[u8]) -> Vec<u8> {
    let window = payload.get(..DATA_URL_SNIFF_CHARS).unwrap_or(payload);
    let mut clean = Vec::with_capacity(window.len());
    // Whether the payload ended inside the window (so its last partial quantum is really the
    // end of the data) rather than being cut by the window.
    let mut complete = window.len() == payload.len();
    let mut i = 0;
    while let Some(&b) = window.get(i) {
        i += 1;
        let mut c = b;
        if c == b'%' {
            // Browsers percent-decode data URL bodies before base64-decoding them.
            match (
                window.get(i).copied().and_then(hex),
                window.get(i + 1).copied().and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    c = hi << 4 | lo;
                    i += 2;
                }
                _ => {
                    // A bad escape is garbage that ends the data; one cut by the window is not.
                    complete |= window.get(i + 1).is_some();
                    break;
                }
            }
        }
        match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' => clean.push(c),
            b'-' => clean.push(b'+'),
            b'_' => clean.push(b'/'),
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => {}
            // Padding or garbage: the data we can trust ends here.
            _ => {
                complete = true;
                break;
            }
        }
    }
    let keep = if complete {
        // A single leftover character carries no whole byte and is invalid base64.
        clean.len() - usize::from(clean.len() % 4 == 1)
    } else {
        // Cut mid-payload: only whole quanta are certain.
        clean.len() - clean.len() % 4
    };
    clean.truncate(keep);
    SNIFF_ENGINE.decode(&clean).unwrap_or_default()
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

// ---------------------------------------------------------------------------------------------
// URL policy (SSRF guard)
// ---------------------------------------------------------------------------------------------

/// Which image URLs may be passed to the model server (which fetches them from inside the GPU
/// server's network: the gateway is the SSRF guard).
///
/// The checks look only at the URL's literal host. Names are **not resolved**: a public-looking
/// name whose DNS points at a private address (or a public server that redirects the model
/// server's fetch to one) still gets through, because the model server resolves and fetches on
/// its own. Operators who need a hard guarantee should set `allowed_hosts` to hosts they control,
/// or block private egress on the GPU server's network.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageUrlPolicy {
    /// Schemes allowed (case-insensitive); default `["https", "http", "data"]`. `file` is
    /// refused unless listed, and listing it lets the model server read its own files.
    pub allowed_schemes: Vec<String>,
    /// If non-empty, only these hosts (exact, case-insensitive; a leading `*.` allows
    /// subdomains, not the bare domain). IP literals may be listed, IPv6 with or without
    /// brackets. This list narrows the private-host check, it does not bypass it: an allowed
    /// private host also needs `allow_private_hosts`. `data:` URLs have no host and are not
    /// affected.
    pub allowed_hosts: Vec<String>,
    /// Allow hosts that are loopback, private, link-local, unique-local, unspecified, CGNAT
    /// (100.64/10) or otherwise not globally routable, IPv4-mapped/compatible/NAT64 forms of
    /// those, and local names (`localhost`, `*.localhost`, `*.local`, `*.internal`,
    /// `*.home.arpa`, and single-label names like `metadata`). Default false.
    pub allow_private_hosts: bool,
    /// Resolve image hosts' names before the call is admitted and refuse a name that
    /// resolves to a private address (or does not resolve). Default true; ignored when
    /// `allow_private_hosts` is set.
    pub resolve_hosts: bool,
    /// The gateway fetches `http(s)` image URLs itself and sends the images on inline, as
    /// `data:` URLs: the model server fetches nothing and never sees the URL. The name is
    /// resolved once and the connection made to the address checked; each redirect is
    /// checked again. Default false.
    pub fetch: bool,
    /// Fetch mode: the largest image, in bytes.
    pub fetch_max_bytes: u64,
    /// Fetch mode: the most pixels (width × height, read from the image's header).
    pub fetch_max_pixels: u64,
    /// Fetch mode: the most image URLs fetched for one request.
    pub fetch_max_images: u32,
    /// Fetch mode: redirects followed per image.
    pub fetch_max_redirects: u32,
    /// Fetch mode: the time one image may take, redirects included.
    pub fetch_timeout_ms: u64,
}

impl Default for ImageUrlPolicy {
    fn default() -> Self {
        Self {
            allowed_schemes: ["https", "http", "data"].map(String::from).to_vec(),
            allowed_hosts: Vec::new(),
            allow_private_hosts: false,
            resolve_hosts: true,
            fetch: false,
            fetch_max_bytes: 10 * 1024 * 1024,
            fetch_max_pixels: 25_000_000,
            fetch_max_images: 8,
            fetch_max_redirects: 3,
            fetch_timeout_ms: 10_000,
        }
    }
}

/// Why an image URL was refused. Messages are written for the API user who sent the URL.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImagePolicyError {
    #[error("image URLs with scheme `{scheme}` are not allowed")]
    SchemeNotAllowed { scheme: String },
    #[error("image URL host `{host}` is not in this gateway's list of allowed image hosts")]
    HostNotAllowed { host: String },
    #[error(
        "image URL host `{host}` is a private address; the gateway does not let the model \
         server fetch from its own network"
    )]
    PrivateHost { host: String },
    #[error(
        "image URL host `{host}` resolves to a private address ({addr}); the gateway does not \
         let the model server fetch from its own network"
    )]
    ResolvesToPrivate { host: String, addr: IpAddr },
    #[error("image URL host `{host}` cannot be resolved: {reason}")]
    Unresolvable { host: String, reason: String },
    #[error(
        "image URLs with scheme `{scheme}` cannot be fetched by the gateway (it fetches \
         http and https URLs and sends the image on inline)"
    )]
    NotFetchable { scheme: String },
    #[error("malformed image URL: {0}")]
    Malformed(String),
}

fn malformed(msg: &str) -> ImagePolicyError {
    ImagePolicyError::Malformed(msg.to_owned())
}

/// Caps user-supplied text echoed in error messages, so a hostile megabyte-long scheme or host
/// cannot bloat logs and responses.
fn clip(s: &str) -> String {
    const MAX: usize = 100;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", s.get(..cut).unwrap_or_default()),
        None => s.to_owned(),
    }
}

/// Longest DNS name (RFC 1035); longer "hosts" cannot be fetched and only serve to bloat errors.
const MAX_HOST_LEN: usize = 253;

impl ImageUrlPolicy {
    /// Checks one image URL. For `data:` URLs (if allowed) returns `Some(DataImage)`; for others
    /// `None`.
    ///
    /// Hosts are checked as the WHATWG URL parser (the `url` crate) normalises them, which is how
    /// `http://2130706433/`, `http://0x7f.1/`, `http://0177.0.0.1/` and `http://127.1/` are all
    /// seen as 127.0.0.1, and IDNA/percent-encoded spellings of a name become the name. Names are
    /// not resolved (see [`ImageUrlPolicy`]).
    ///
    /// Because the model server re-parses the original string with its own parser, URLs on which
    /// parsers are known to disagree are refused as malformed: whitespace, control characters or
    /// backslashes anywhere, and credentials (`user:pass@`) in the authority.
    ///
    /// # Errors
    ///
    /// [`ImagePolicyError::SchemeNotAllowed`] for a scheme not in `allowed_schemes`,
    /// [`ImagePolicyError::HostNotAllowed`] for a host outside a non-empty `allowed_hosts`,
    /// [`ImagePolicyError::PrivateHost`] for a local host unless `allow_private_hosts`, and
    /// [`ImagePolicyError::Malformed`] for anything that does not parse (or is refused above).
    pub fn check(&self, url: &str) -> Result<Option<DataImage>, ImagePolicyError> {
        let scheme = scheme_of(url)?;
        if !self
            .allowed_schemes
            .iter()
            .any(|s| s.trim().eq_ignore_ascii_case(&scheme))
        {
            return Err(ImagePolicyError::SchemeNotAllowed { scheme });
        }
        // data: URLs carry the image inline; there is no host to fetch. They skip `Url::parse`,
        // which would copy a multi-megabyte payload for nothing.
        if scheme == "data" {
            return read_data_url(url).map(Some);
        }

        if url
            .chars()
            .any(|c| c == '\\' || c.is_ascii_whitespace() || c.is_control())
        {
            // WHATWG treats `\` as `/` in http(s) URLs and silently strips tabs/newlines; Python
            // and curl do not, so `http://evil.example\@127.0.0.1/` would be checked as one host
            // and fetched from another.
            return Err(malformed(
                "image URLs must not contain whitespace, control characters or backslashes; \
                 percent-encode them",
            ));
        }
        let parsed = Url::parse(url).map_err(|e| malformed(&format!("{e}")))?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            // `http://public.example:80@10.0.0.1/` and friends are the classic parser-confusion
            // bypass, and image URLs have no legitimate use for credentials.
            return Err(malformed(
                "image URLs must not contain credentials (`user:pass@`)",
            ));
        }

        let host = match parsed.host() {
            Some(Host::Domain("")) | None => {
                // `file:///path` has no host: the operator opted into local files by listing
                // `file`, so there is nothing further to check.
                if parsed.scheme() == "file" {
                    return Ok(None);
                }
                return Err(malformed("image URL has no host"));
            }
            Some(host) => normalize_host(host.to_owned(), parsed.is_special())?,
        };

        if !self.allowed_hosts.is_empty()
            && !self
                .allowed_hosts
                .iter()
                .any(|pattern| host_matches(&host, pattern))
        {
            return Err(ImagePolicyError::HostNotAllowed {
                host: host.to_string(),
            });
        }
        if !self.allow_private_hosts && is_private_host(&host) {
            return Err(ImagePolicyError::PrivateHost {
                host: host.to_string(),
            });
        }
        Ok(None)
    }
}

impl ImageUrlPolicy {
    /// The host name of an image URL that passed [`ImageUrlPolicy::check`], when it must be
    /// resolved before the call goes on: a name (not an address literal, not `data:`) and
    /// the policy resolves names. The text check cannot see where a public-looking name
    /// points (`169.254.169.254.nip.io`), but the model server will fetch from there.
    pub fn name_to_resolve(&self, url: &str) -> Option<String> {
        if self.allow_private_hosts || !self.resolve_hosts {
            return None;
        }
        let scheme = scheme_of(url).ok()?;
        if scheme == "data" || scheme == "file" {
            return None;
        }
        let parsed = Url::parse(url).ok()?;
        match normalize_host(parsed.host()?.to_owned(), parsed.is_special()).ok()? {
            Host::Domain(name) => Some(name),
            Host::Ipv4(_) | Host::Ipv6(_) => None,
        }
    }
}

impl ImageUrlPolicy {
    /// Whether the gateway fetches an image URL that passed [`ImageUrlPolicy::check`]
    /// itself: in fetch mode, `http` and `https` URLs; `data:` URLs are inline already.
    ///
    /// # Errors
    ///
    /// [`ImagePolicyError::NotFetchable`] in fetch mode for any other scheme the policy
    /// allows (the model server would otherwise be sent a URL to fetch).
    pub fn fetches(&self, url: &str) -> Result<bool, ImagePolicyError> {
        if !self.fetch {
            return Ok(false);
        }
        match scheme_of(url)?.as_str() {
            "data" => Ok(false),
            "http" | "https" => Ok(true),
            scheme => Err(ImagePolicyError::NotFetchable {
                scheme: clip(scheme),
            }),
        }
    }
}

/// Whether the model server must not be sent to `addr` (see [`ImageUrlPolicy`]): the same
/// ranges the text check refuses in address literals.
pub fn is_private_address(addr: IpAddr) -> bool {
    is_private_ip(addr)
}

/// The URL's scheme, lowercased, read by hand so it is known before any full parse (and so a
/// data URL never needs one). Leading whitespace is not skipped: see the whitespace rule in
/// [`ImageUrlPolicy::check`].
fn scheme_of(url: &str) -> Result<String, ImagePolicyError> {
    // Real schemes are short; bounding the search keeps a colon-less 20 MB string cheap.
    const MAX_SCHEME_LEN: usize = 32;
    let colon = url.bytes().take(MAX_SCHEME_LEN + 1).position(|b| b == b':');
    let scheme = colon.and_then(|c| url.get(..c)).unwrap_or_default();
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if valid {
        Ok(scheme.to_ascii_lowercase())
    } else {
        Err(malformed(
            "image URL must be absolute with a scheme, e.g. `https://…` or `data:image/png;base64,…`",
        ))
    }
}

/// The host as the WHATWG host parser sees it, with any trailing root dot removed.
///
/// For special schemes (http, https, ftp, ws, wss, file) the `url` crate has already applied
/// IDNA and IPv4 number parsing. Other schemes keep an opaque host, which would let
/// `gopher://2130706433/` slip past as a "name" if an operator allowed such a scheme, so those are
/// run through the same host parser here.
fn normalize_host(host: Host<String>, special: bool) -> Result<Host<String>, ImagePolicyError> {
    let host = match host {
        Host::Domain(d) if !special => {
            Host::parse(&d).map_err(|e| malformed(&format!("image URL host: {e}")))?
        }
        other => other,
    };
    Ok(match host {
        Host::Domain(d) => {
            let d = d.strip_suffix('.').unwrap_or(&d).to_ascii_lowercase();
            if d.is_empty() || d.len() > MAX_HOST_LEN {
                return Err(malformed(
                    "image URL host is empty or longer than 253 characters",
                ));
            }
            Host::Domain(d)
        }
        other => other,
    })
}

/// Whether `host` matches one `allowed_hosts` entry (see [`ImageUrlPolicy::allowed_hosts`]).
/// Entries go through the same normalisation as URL hosts, so `EXAMPLE.com.`, `[::1]`, `::1` and
/// IDN spellings compare as expected; entries that cannot be parsed match nothing.
fn host_matches(host: &Host<String>, pattern: &str) -> bool {
    let pattern = pattern.trim();
    if let Some(suffix) = pattern.strip_prefix("*.") {
        let (Host::Domain(name), Ok(Host::Domain(suffix))) = (host, parse_pattern(suffix)) else {
            return false;
        };
        return name
            .strip_suffix(suffix.as_str())
            .is_some_and(|label| label.len() > 1 && label.ends_with('.'));
    }
    parse_pattern(pattern).is_ok_and(|p| &p == host)
}

fn parse_pattern(pattern: &str) -> Result<Host<String>, ImagePolicyError> {
    // A bare IPv6 address is natural in config but is not valid host syntax without brackets.
    if let Ok(addr) = pattern.parse::<Ipv6Addr>() {
        return Ok(Host::Ipv6(addr));
    }
    let host = Host::parse(pattern).map_err(|e| malformed(&format!("{e}")))?;
    normalize_host(host, true)
}

fn is_private_host(host: &Host<String>) -> bool {
    match host {
        Host::Ipv4(a) => is_private_ip(IpAddr::V4(*a)),
        Host::Ipv6(a) => is_private_ip(IpAddr::V6(*a)),
        Host::Domain(d) => is_local_name(d),
    }
}

/// Names that only ever resolve inside the local machine or network.
///
/// Single-label names (`metadata`, `redis`, `localhost`) are included because resolvers expand
/// them with the GPU server's search domains, which is exactly its internal network; no public
/// image host is a bare top-level label.
fn is_local_name(name: &str) -> bool {
    const LOCAL_NAMES: &[&str] = &["localhost.localdomain", "ip6-localhost", "ip6-loopback"];
    // `.localhost` (RFC 6761), `.local` (mDNS), `.internal` (ICANN private use, e.g.
    // metadata.google.internal), `.home.arpa` (RFC 8375).
    const LOCAL_SUFFIXES: &[&str] = &[".localhost", ".local", ".internal", ".home.arpa"];
    !name.contains('.')
        || LOCAL_NAMES.contains(&name)
        || LOCAL_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Whether an address is outside the globally routable unicast space: the private, loopback,
/// link-local, CGNAT, unspecified, multicast, reserved and documentation ranges of the IANA
/// special-purpose registries. IPv6 forms that embed an IPv4 address (mapped, compatible, NAT64,
/// 6to4) are judged by that address, since the GPU server's stack may route them to it.
fn is_private_ip(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => is_private_v4(a),
        IpAddr::V6(a) => is_private_v6(a),
    }
}

fn is_private_v4(addr: Ipv4Addr) -> bool {
    const RANGES: &[([u8; 4], u32)] = &[
        ([0, 0, 0, 0], 8),  // "this network", incl. 0.0.0.0 which Linux maps to localhost
        ([10, 0, 0, 0], 8), // private
        ([100, 64, 0, 0], 10), // CGNAT shared address space
        ([127, 0, 0, 0], 8), // loopback
        ([169, 254, 0, 0], 16), // link-local, incl. cloud metadata 169.254.169.254
        ([172, 16, 0, 0], 12), // private
        ([192, 0, 0, 0], 24), // IETF protocol assignments
        ([192, 0, 2, 0], 24), // documentation
        ([192, 168, 0, 0], 16), // private
        ([198, 18, 0, 0], 15), // benchmarking
        ([198, 51, 100, 0], 24), // documentation
        ([203, 0, 113, 0], 24), // documentation
        ([224, 0, 0, 0], 4), // multicast
        ([240, 0, 0, 0], 4), // reserved, incl. broadcast 255.255.255.255
    ];
    let bits = addr.to_bits();
    RANGES
        .iter()
        .any(|&(net, len)| bits >> (32 - len) == u32::from_be_bytes(net) >> (32 - len))
}

fn is_private_v6(addr: Ipv6Addr) -> bool {
    const RANGES: &[(u128, u32)] = &[
        (0x0064_ff9b_0001 << 80, 48), // NAT64 local-use 64:ff9b:1::/48
        (0x0100 << 112, 64),          // discard-only 100::/64
        (0x2001_0db8 << 96, 32),      // documentation 2001:db8::/32
        (0xfc00 << 112, 7),           // unique-local fc00::/7
        (0xfe80 << 112, 10),          // link-local fe80::/10
        (0xfec0 << 112, 10),          // deprecated site-local fec0::/10
        (0xff00 << 112, 8),           // multicast ff00::/8
    ];
    let bits = addr.to_bits();
    let prefix = |net: u128, len: u32| bits >> (128 - len) == net >> (128 - len);
    // The low 32 bits, for the forms that embed an IPv4 address there (truncation intended).
    let low_v4 = Ipv4Addr::from_bits(bits as u32);

    if addr.is_unspecified() || addr.is_loopback() {
        return true;
    }
    if let Some(v4) = addr.to_ipv4_mapped() {
        return is_private_v4(v4); // ::ffff:a.b.c.d
    }
    if prefix(0, 96) {
        return is_private_v4(low_v4); // deprecated IPv4-compatible ::a.b.c.d
    }
    if prefix(0x0064_ff9b << 96, 96) {
        return is_private_v4(low_v4); // NAT64 well-known prefix 64:ff9b::/96
    }
    if prefix(0x2002 << 112, 16) {
        // 6to4: 2002:AABB:CCDD::/48 embeds a.b.c.d in bits 16..48.
        return is_private_v4(Ipv4Addr::from_bits((bits >> 80) as u32)); // truncation intended
    }
    RANGES.iter().any(|&(net, len)| prefix(net, len))
}

// ---------------------------------------------------------------------------------------------
// Token estimate
// ---------------------------------------------------------------------------------------------

/// Longest side the estimate assumes the encoder is fed, after downscaling.
const MAX_ENCODED_SIDE: u64 = 1456;
/// One token per patch of this many pixels square.
const PATCH_SIDE: u64 = 28;
const MIN_IMAGE_TOKENS: u64 = 64;
const MAX_IMAGE_TOKENS: u64 = 4096;
const UNKNOWN_SIZE_TOKENS: u64 = 256;

/// Prompt tokens an image is estimated to cost on a ViT-style vision encoder: one token per
/// 28×28 patch (partial patches count) after scaling the longer side down to at most 1456 px
/// (keeping the aspect ratio, rounding to the nearest pixel), clamped to 64..=4096; 256 when the
/// size is unknown.
///
/// This is an **estimate** for admission and accounting before the model server has answered;
/// the upstream's real prompt-token count wins whenever it is reported.
///
/// It is symmetric in width and height, monotone in each side while that side is not the longer
/// one above 1456 px, and monotone under uniform scaling. It is *not* monotone in the longer side
/// beyond 1456 px: a wider image is scaled down more, so its shorter side gets fewer patches —
/// which is also what the encoder really does with it.
#[must_use]
pub fn estimate_image_tokens(size: Option<ImageSize>) -> u64 {
    let Some(ImageSize { width, height }) = size else {
        return UNKNOWN_SIZE_TOKENS;
    };
    let (width, height) = (u64::from(width), u64::from(height));
    let longer = width.max(height);
    // u32 × 1456 fits easily in u64, so the rounding arithmetic cannot overflow.
    let scale = |side: u64| {
        if longer > MAX_ENCODED_SIDE {
            (side * MAX_ENCODED_SIDE + longer / 2) / longer
        } else {
            side
        }
    };
    let patches = scale(width).div_ceil(PATCH_SIDE) * scale(height).div_ceil(PATCH_SIDE);
    patches.clamp(MIN_IMAGE_TOKENS, MAX_IMAGE_TOKENS)
}

#[cfg(test)]
// Tests build fixtures by hand; panicking on a broken fixture is the point there.
#[expect(clippy::indexing_slicing, reason = "tests index their own fixtures")]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use proptest::prelude::*;

    // --- fixtures: real (minimal) encodings, built byte by byte ------------------------------

    /// PNG signature + IHDR; the size is known once byte 24 is present.
    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut b = PNG_SIGNATURE.to_vec();
        b.extend_from_slice(&13u32.to_be_bytes());
        b.extend_from_slice(b"IHDR");
        b.extend_from_slice(&w.to_be_bytes());
        b.extend_from_slice(&h.to_be_bytes());
        b.extend_from_slice(&[8, 6, 0, 0, 0]); // depth, colour type, compression, filter, interlace
        b.extend_from_slice(&[0xDE, 0xAD, 0xBE, 0xEF]); // CRC (not checked)
        b
    }
    const PNG_NEEDED: usize = 24;

    fn gif(w: u16, h: u16) -> Vec<u8> {
        let mut b = b"GIF89a".to_vec();
        b.extend_from_slice(&w.to_le_bytes());
        b.extend_from_slice(&h.to_le_bytes());
        b.extend_from_slice(&[0xF7, 0, 0]); // flags, background, aspect
        b
    }
    const GIF_NEEDED: usize = 10;

    fn riff(chunk: &[u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut b = b"RIFF".to_vec();
        b.extend_from_slice(&(4 + 8 + payload.len() as u32).to_le_bytes());
        b.extend_from_slice(b"WEBP");
        b.extend_from_slice(chunk);
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn webp_vp8x(w: u32, h: u32) -> Vec<u8> {
        let mut p = vec![0x10, 0, 0, 0]; // alpha flag, reserved
        p.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
        p.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
        riff(b"VP8X", &p)
    }
    const VP8X_NEEDED: usize = 30;

    fn webp_vp8l(w: u32, h: u32) -> Vec<u8> {
        let bits = (w - 1) | (h - 1) << 14 | 1 << 28; // alpha hint set, version 0
        let mut p = vec![0x2F];
        p.extend_from_slice(&bits.to_le_bytes());
        p.extend_from_slice(&[0; 8]); // start of the (unread) bitstream
        riff(b"VP8L", &p)
    }
    const VP8L_NEEDED: usize = 25;

    fn webp_vp8(w: u16, h: u16) -> Vec<u8> {
        let mut p = vec![0x50, 0x2A, 0x00]; // key frame tag (bit 0 clear), version, partition size
        p.extend_from_slice(&[0x9D, 0x01, 0x2A]);
        p.extend_from_slice(&(w | 1 << 14).to_le_bytes()); // a scaling hint the reader must mask
        p.extend_from_slice(&h.to_le_bytes());
        p.extend_from_slice(&[0; 10]);
        riff(b"VP8 ", &p)
    }
    const VP8_NEEDED: usize = 30;

    fn segment(marker: u8, body: &[u8]) -> Vec<u8> {
        let mut b = vec![0xFF, marker];
        b.extend_from_slice(&(body.len() as u16 + 2).to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    fn sof(marker: u8, w: u16, h: u16) -> Vec<u8> {
        let mut body = vec![8];
        body.extend_from_slice(&h.to_be_bytes());
        body.extend_from_slice(&w.to_be_bytes());
        body.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        segment(marker, &body)
    }

    /// SOI, an EXIF APP1 whose contents contain a decoy SOF (so a reader that scans instead of
    /// skipping by length gets it wrong), a DQT, then the frame header. Returns the bytes and the
    /// offset just past the width field.
    fn jpeg(sof_marker: u8, w: u16, h: u16) -> (Vec<u8>, usize) {
        let mut b = vec![0xFF, 0xD8];
        let mut exif = b"Exif\0\0MM\0*".to_vec();
        exif.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08, 0x00, 0x01, 0x00, 0x01]);
        exif.extend_from_slice(&[0xFF, 0xD9, 0x12, 0x34]);
        b.extend(segment(0xE1, &exif));
        b.extend(segment(0xDB, &[0u8; 65]));
        let needed = b.len() + 9;
        b.extend(sof(sof_marker, w, h));
        b.extend(segment(0xC4, &[0u8; 20])); // DHT
        b.extend(segment(0xDA, &[1, 1, 0, 0, 0x3F, 0])); // SOS
        b.extend_from_slice(&[0x12, 0x34, 0xFF, 0x00, 0x56, 0xFF, 0xD9]);
        (b, needed)
    }

    fn bmp(w: i32, h: i32) -> Vec<u8> {
        let mut b = b"BM".to_vec();
        b.extend_from_slice(&[0; 12]); // file size, reserved, pixel offset
        b.extend_from_slice(&40u32.to_le_bytes());
        b.extend_from_slice(&w.to_le_bytes());
        b.extend_from_slice(&h.to_le_bytes());
        b.extend_from_slice(&[1, 0, 24, 0]);
        b
    }
    const BMP_NEEDED: usize = 26;

    fn size(width: u32, height: u32) -> Option<ImageSize> {
        Some(ImageSize { width, height })
    }

    /// Every strict prefix shorter than `needed` reads as unknown; every longer one (including the
    /// whole buffer) reads the right size. Nothing may panic along the way.
    fn assert_prefixes(bytes: &[u8], needed: usize, expected: Option<ImageSize>) {
        for n in 0..=bytes.len() {
            let got = image_size(&bytes[..n]);
            if n < needed {
                assert_eq!(got, None, "prefix of {n} bytes (needs {needed})");
            } else {
                assert_eq!(got, expected, "prefix of {n} bytes");
            }
        }
    }

    // --- image_size -------------------------------------------------------------------------

    #[test]
    fn png_ihdr() {
        assert_prefixes(&png(800, 600), PNG_NEEDED, size(800, 600));
        assert_eq!(image_size(&png(0, 5)), None);
        assert_eq!(image_size(&png(1 << 31, 5)), None, "beyond the PNG limit");
        let mut not_ihdr = png(1, 1);
        not_ihdr[12..16].copy_from_slice(b"IDAT");
        assert_eq!(image_size(&not_ihdr), None);
    }

    #[test]
    fn gif_logical_screen() {
        assert_prefixes(&gif(320, 240), GIF_NEEDED, size(320, 240));
        let mut gif87 = gif(7, 9);
        gif87[..6].copy_from_slice(b"GIF87a");
        assert_eq!(image_size(&gif87), size(7, 9));
        assert_eq!(image_size(&gif(0, 9)), None);
    }

    #[test]
    fn webp_variants() {
        assert_prefixes(&webp_vp8x(4000, 3000), VP8X_NEEDED, size(4000, 3000));
        assert_prefixes(&webp_vp8x(1 << 24, 1), VP8X_NEEDED, size(1 << 24, 1));
        assert_prefixes(&webp_vp8l(1024, 768), VP8L_NEEDED, size(1024, 768));
        assert_prefixes(&webp_vp8l(16384, 1), VP8L_NEEDED, size(16384, 1));
        assert_prefixes(&webp_vp8(640, 480), VP8_NEEDED, size(640, 480));

        let mut interframe = webp_vp8(640, 480);
        interframe[20] |= 1;
        assert_eq!(
            image_size(&interframe),
            None,
            "only key frames carry the size"
        );
        let mut bad_start = webp_vp8(640, 480);
        bad_start[24] = 0;
        assert_eq!(image_size(&bad_start), None);
        let mut bad_version = webp_vp8l(10, 10);
        bad_version[24] |= 0x20;
        assert_eq!(image_size(&bad_version), None);
        assert_eq!(image_size(&riff(b"ALPH", &[0; 16])), None);
    }

    #[test]
    fn jpeg_baseline_after_exif() {
        let (b, needed) = jpeg(0xC0, 1920, 1080);
        assert_prefixes(&b, needed, size(1920, 1080));
    }

    #[test]
    fn jpeg_progressive_and_other_sofs() {
        let (b, needed) = jpeg(0xC2, 33, 4000);
        assert_prefixes(&b, needed, size(33, 4000));
        for marker in [
            0xC1, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF,
        ] {
            assert_eq!(
                image_size(&jpeg(marker, 5, 6).0),
                size(5, 6),
                "SOF {marker:#x}"
            );
        }
    }

    #[test]
    fn jpeg_tolerates_fill_bytes_and_stray_bytes() {
        let mut b = vec![0xFF, 0xD8, 0xFF, 0xFF, 0xFF]; // fill bytes before a marker
        b.extend(segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"));
        b.extend_from_slice(&[0x00, 0x13, 0x37]); // stray bytes libjpeg also skips
        b.extend_from_slice(&[0xFF, 0xD0]); // a standalone marker
        b.extend(sof(0xC0, 10, 20));
        assert_eq!(image_size(&b), size(10, 20));
    }

    #[test]
    fn jpeg_corrupt_or_sizeless() {
        // Segment length shorter than its own length field.
        let mut b = vec![0xFF, 0xD8, 0xFF, 0xE1, 0x00, 0x01];
        b.extend(sof(0xC0, 1, 1));
        assert_eq!(image_size(&b), None);
        // Segment claiming to run past the end of the data.
        assert_eq!(
            image_size(&[0xFF, 0xD8, 0xFF, 0xE1, 0xFF, 0xFF, 1, 2, 3]),
            None
        );
        // Scan data or end of image before any frame header.
        let mut sos_first = vec![0xFF, 0xD8];
        sos_first.extend(segment(0xDA, &[0; 6]));
        sos_first.extend(sof(0xC0, 1, 1));
        assert_eq!(image_size(&sos_first), None);
        assert_eq!(image_size(&[0xFF, 0xD8, 0xFF, 0xD9]), None);
        // Height deferred to a DNL marker, and a frame header too short to hold a size.
        assert_eq!(image_size(&jpeg(0xC0, 100, 0).0), None);
        assert_eq!(
            image_size(&[0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x07, 8, 0, 1, 0, 1]),
            None
        );
        // DHT, JPG and DAC share the SOF range but are not frame headers: skipped by length.
        let mut dht_first = vec![0xFF, 0xD8];
        dht_first.extend(segment(0xC4, &[8, 0, 9, 0, 9]));
        dht_first.extend(segment(0xCC, &[8, 0, 9, 0, 9]));
        dht_first.extend(sof(0xC0, 3, 4));
        assert_eq!(image_size(&dht_first), size(3, 4));
    }

    #[test]
    fn jpeg_hostile_megabyte_is_linear() {
        // A megabyte of fill bytes, then of stray bytes: must finish with None.
        let mut fill = vec![0xFF, 0xD8];
        fill.resize(1 << 20, 0xFF);
        let mut stray = vec![0xFF, 0xD8];
        stray.resize(1 << 20, 0x42);
        assert_eq!(image_size(&fill), None);
        assert_eq!(image_size(&stray), None);
    }

    #[test]
    fn bmp_headers() {
        assert_prefixes(&bmp(640, -480), BMP_NEEDED, size(640, 480));
        assert_eq!(image_size(&bmp(640, i32::MIN)), size(640, 1 << 31));
        assert_eq!(image_size(&bmp(-640, 480)), None);
        assert_eq!(image_size(&bmp(640, 0)), None);
        let mut core = b"BM".to_vec();
        core.extend_from_slice(&[0; 12]);
        core.extend_from_slice(&12u32.to_le_bytes());
        core.extend_from_slice(&[0x20, 0x00, 0x10, 0x00]);
        assert_eq!(image_size(&core), size(32, 16));
        let mut unknown_dib = bmp(1, 1);
        unknown_dib[14] = 41;
        assert_eq!(image_size(&unknown_dib), None);
    }

    #[test]
    fn unknown_formats() {
        assert_eq!(image_size(b""), None);
        assert_eq!(
            image_size(b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
            None
        );
        assert_eq!(image_size(b"\0\0\0\x1cftypavif"), None);
    }

    // --- data: URLs ---------------------------------------------------------------------------

    fn data_url(mime: &str, bytes: &[u8]) -> String {
        format!("data:{mime};base64,{}", STANDARD.encode(bytes))
    }

    #[test]
    fn data_url_reads_size_and_mime() {
        let url = data_url("image/png", &png(64, 48));
        let got = read_data_url(&url).unwrap();
        assert_eq!(got.mime_type, "image/png");
        assert_eq!(got.size, size(64, 48));
        assert_eq!(got.encoded_len, url.len() - "data:image/png;base64,".len());

        // A 10-byte GIF ends in a padded partial quantum that must still be decoded.
        let gif_url = data_url("image/gif", &gif(3, 2));
        assert!(gif_url.ends_with("=="));
        assert_eq!(read_data_url(&gif_url).unwrap().size, size(3, 2));
    }

    #[test]
    fn data_url_tolerated_spellings() {
        let png_b64 = STANDARD.encode(png(5, 7));
        let cases = [
            format!("DATA:Image/PNG;BASE64,{png_b64}"),
            format!("data:image/png;name=cat.png;base64,{png_b64}"),
            format!("data: image/png ; base64 ,{png_b64}"),
            // Line-wrapped base64 (MIME style).
            format!(
                "data:image/png;base64,{}\r\n{}",
                &png_b64[..20],
                &png_b64[20..]
            ),
            // URL-safe alphabet and percent-encoded characters.
            format!(
                "data:image/png;base64,{}",
                URL_SAFE_NO_PAD.encode(png(5, 7))
            ),
            format!(
                "data:image/png;base64,{}",
                png_b64.replace('+', "%2B").replace('/', "%2f")
            ),
        ];
        for url in &cases {
            let got = read_data_url(url).unwrap();
            assert_eq!(
                (got.mime_type.as_str(), got.size),
                ("image/png", size(5, 7)),
                "{url}"
            );
        }
    }

    #[test]
    fn data_url_without_base64_or_with_unknown_data() {
        let svg = read_data_url("data:image/svg+xml,%3Csvg%20xmlns%3D%22%22%2F%3E").unwrap();
        assert_eq!((svg.mime_type.as_str(), svg.size), ("image/svg+xml", None));
        let junk = read_data_url("data:image/jpeg;base64,!!!!").unwrap();
        assert_eq!((junk.size, junk.encoded_len), (None, 4));
        let empty = read_data_url("data:image/webp;base64,").unwrap();
        assert_eq!((empty.size, empty.encoded_len), (None, 0));
        // The declared type is reported as declared; the size comes from the bytes.
        let lying = read_data_url(&data_url("image/jpeg", &png(2, 3))).unwrap();
        assert_eq!(
            (lying.mime_type.as_str(), lying.size),
            ("image/jpeg", size(2, 3))
        );
    }

    #[test]
    fn data_url_errors() {
        let not_image = read_data_url("data:text/plain;base64,aGVsbG8=").unwrap_err();
        assert_eq!(
            not_image.to_string(),
            "malformed image URL: data URL media type `text/plain` is not an image type \
             (expected image/*)"
        );
        for bad in [
            "https://example.com/a.png",
            "data",
            "dat",
            "",
            "data:image/png;base64",
            "data:;base64,AAAA",
            "data:,hello",
            "data:image/;base64,AAAA",
            "data:image/p<n>g;base64,AAAA",
            "data:imagex/png;base64,AAAA",
        ] {
            assert!(
                matches!(read_data_url(bad), Err(ImagePolicyError::Malformed(_))),
                "{bad:?}"
            );
        }
        // The comma has to come within the first KiB.
        let long_header = format!("data:image/png;{};base64,AAAA", "x=y;".repeat(300));
        assert!(read_data_url(&long_header).is_err());
        // A multi-byte character right after `data` must not trip a char-boundary slice.
        assert!(read_data_url("datä:image/png;base64,AAAA").is_err());
        assert!(read_data_url("dat\u{e9}").is_err());
    }

    #[test]
    fn big_data_url_only_decodes_a_prefix() {
        // ~3 MB of base64 with trailing garbage: the size comes from the prefix, and the
        // garbage past it is never looked at (it would fail the decode).
        let mut image = png(3000, 2000);
        image.resize(2_250_000, 0);
        let mut url = data_url("image/png", &image);
        url.push_str("!!! not base64 !!!");
        assert!(url.len() > 3_000_000);
        let got = read_data_url(&url).unwrap();
        assert_eq!(got.size, size(3000, 2000));
        assert_eq!(got.encoded_len, url.len() - "data:image/png;base64,".len());
        // The policy path takes the same shortcut.
        assert_eq!(ImageUrlPolicy::default().check(&url).unwrap(), Some(got));
    }

    #[test]
    fn jpeg_frame_header_beyond_the_prefix_is_unknown() {
        // Five maximal APPn segments (~320 KiB) fit inside the 384 KiB decoded window, nine do not.
        let jpeg_with_apps = |n: usize| {
            let mut b = vec![0xFF, 0xD8];
            for _ in 0..n {
                b.extend(segment(0xE2, &[0x55; 65533]));
            }
            b.extend(sof(0xC2, 4032, 3024));
            b
        };
        let near = read_data_url(&data_url("image/jpeg", &jpeg_with_apps(5))).unwrap();
        assert_eq!(near.size, size(4032, 3024));
        let far = read_data_url(&data_url("image/jpeg", &jpeg_with_apps(9))).unwrap();
        assert_eq!(far.size, None);
    }

    // --- URL policy -----------------------------------------------------------------------------

    fn private(host: &str) -> Result<Option<DataImage>, ImagePolicyError> {
        Err(ImagePolicyError::PrivateHost { host: host.into() })
    }

    #[test]
    fn default_policy() {
        let policy = ImageUrlPolicy::default();
        assert_eq!(policy.allowed_schemes, ["https", "http", "data"]);
        assert!(policy.allowed_hosts.is_empty() && !policy.allow_private_hosts);

        assert_eq!(
            policy.check("https://images.example.com/cat.png?sig=abc"),
            Ok(None)
        );
        assert_eq!(policy.check("http://93.184.215.14:8080/a.jpg"), Ok(None));
        assert_eq!(policy.check("HTTPS://Images.Example.COM/x"), Ok(None));
        assert_eq!(policy.check("https://[2606:4700::1111]/x"), Ok(None));
        assert_eq!(policy.check("https://bücher.example/x"), Ok(None));
        assert_eq!(
            policy.check(&data_url("image/png", &png(1, 2))),
            Ok(Some(DataImage {
                mime_type: "image/png".into(),
                size: size(1, 2),
                encoded_len: 44,
            }))
        );
    }

    #[test]
    fn refused_schemes() {
        let policy = ImageUrlPolicy::default();
        let err = policy.check("file:///etc/passwd").unwrap_err();
        assert_eq!(
            err.to_string(),
            "image URLs with scheme `file` are not allowed"
        );
        for (url, scheme) in [
            ("gopher://127.0.0.1:6379/_INFO", "gopher"),
            ("FTP://example.com/a.png", "ftp"),
            ("javascript:alert(1)", "javascript"),
            ("blob:https://example.com/uuid", "blob"),
        ] {
            assert_eq!(
                policy.check(url),
                Err(ImagePolicyError::SchemeNotAllowed {
                    scheme: scheme.into()
                })
            );
        }
        let no_data = ImageUrlPolicy {
            allowed_schemes: vec!["https".into()],
            ..ImageUrlPolicy::default()
        };
        assert_eq!(
            no_data.check("data:image/png;base64,AAAA"),
            Err(ImagePolicyError::SchemeNotAllowed {
                scheme: "data".into()
            })
        );
        assert_eq!(
            no_data.check("http://example.com/"),
            Err(ImagePolicyError::SchemeNotAllowed {
                scheme: "http".into()
            })
        );
    }

    #[test]
    fn file_scheme_only_when_listed() {
        let policy = ImageUrlPolicy {
            allowed_schemes: vec!["FILE".into()],
            ..ImageUrlPolicy::default()
        };
        assert_eq!(policy.check("file:///srv/images/a.png"), Ok(None));
        assert_eq!(policy.check("file://localhost/srv/a.png"), Ok(None));
        // A file URL naming another machine is still a host the policy judges.
        assert_eq!(
            policy.check("file://fileserver/share/a.png"),
            private("fileserver")
        );
    }

    #[test]
    fn url_crate_normalises_odd_ipv4_forms() {
        // The policy relies on this WHATWG behaviour (shared with inet_aton, which the model
        // server's resolver would apply): pin it so a url upgrade that changes it fails here.
        for odd in [
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://127.0.0.1./",
            "http://%31%32%37.0.0.1/",
        ] {
            let parsed = Url::parse(odd).unwrap();
            assert_eq!(
                parsed.host(),
                Some(Host::Ipv4(Ipv4Addr::LOCALHOST)),
                "{odd}"
            );
            assert_eq!(parsed.as_str(), "http://127.0.0.1/");
        }
        // Numeric forms that overflow are parse errors, not names.
        for bad in [
            "http://4294967296/",
            "http://1.2.3.4.5/",
            "http://08.0.0.1/",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
        // Non-special schemes keep an opaque host (hence `normalize_host`).
        let gopher = Url::parse("gopher://2130706433/").unwrap();
        assert_eq!(gopher.host(), Some(Host::Domain("2130706433")));
        // IPv4-mapped IPv6 stays IPv6.
        let mapped = Url::parse("http://[::ffff:127.0.0.1]/").unwrap();
        assert_eq!(mapped.host_str(), Some("[::ffff:7f00:1]"));
    }

    #[test]
    fn private_hosts_refused_by_default() {
        let policy = ImageUrlPolicy::default();
        let cases = [
            ("http://localhost/a.png", "localhost"),
            ("http://LOCALHOST./a.png", "localhost"),
            ("http://api.localhost/a.png", "api.localhost"),
            ("http://metadata/computeMetadata/v1/", "metadata"),
            (
                "http://metadata.google.internal/x",
                "metadata.google.internal",
            ),
            ("http://printer.local/x", "printer.local"),
            ("http://127.0.0.1/a.png", "127.0.0.1"),
            ("http://127.9.9.9:8000/a.png", "127.9.9.9"),
            ("http://[::1]/a.png", "[::1]"),
            ("http://[::]/a.png", "[::]"),
            ("http://0.0.0.0/a.png", "0.0.0.0"),
            ("http://10.0.0.5/a.png", "10.0.0.5"),
            ("http://172.16.0.1/a.png", "172.16.0.1"),
            ("http://172.31.255.255/a.png", "172.31.255.255"),
            ("http://192.168.1.10/a.png", "192.168.1.10"),
            (
                "http://169.254.169.254/latest/meta-data/",
                "169.254.169.254",
            ),
            ("http://100.64.0.1/a.png", "100.64.0.1"),
            ("http://100.127.255.254/a.png", "100.127.255.254"),
            ("http://224.0.0.1/a.png", "224.0.0.1"),
            ("http://255.255.255.255/a.png", "255.255.255.255"),
            ("http://[fc00::1]/a.png", "[fc00::1]"),
            ("http://[fd12:3456::1]/a.png", "[fd12:3456::1]"),
            ("http://[fe80::1]/a.png", "[fe80::1]"),
            ("http://[ff02::1]/a.png", "[ff02::1]"),
            ("http://[::ffff:127.0.0.1]/a.png", "[::ffff:7f00:1]"),
            ("http://[::ffff:10.1.2.3]/a.png", "[::ffff:a01:203]"),
            ("http://[::127.0.0.1]/a.png", "[::7f00:1]"),
            ("http://[64:ff9b::a9fe:a9fe]/a.png", "[64:ff9b::a9fe:a9fe]"),
            ("http://[2002:c0a8:101::1]/a.png", "[2002:c0a8:101::1]"),
            // Odd IPv4 spellings that the WHATWG parser (like inet_aton) reads as 127.0.0.1.
            ("http://2130706433/a.png", "127.0.0.1"),
            ("http://0x7f.1/a.png", "127.0.0.1"),
            ("http://0x7f000001/a.png", "127.0.0.1"),
            ("http://0177.0.0.1/a.png", "127.0.0.1"),
            ("http://127.1/a.png", "127.0.0.1"),
            ("http://127.0.0.1./a.png", "127.0.0.1"),
            ("http://0/a.png", "0.0.0.0"),
            ("http://%31%32%37.0.0.1/a.png", "127.0.0.1"),
            ("http://\u{ff11}\u{ff12}\u{ff17}.0.0.1/a.png", "127.0.0.1"),
            ("http://127\u{3002}0\u{3002}0\u{3002}1/a.png", "127.0.0.1"),
            ("http://0xa9.0xfe.0xa9.0xfe/", "169.254.169.254"),
        ];
        for (url, host) in cases {
            assert_eq!(policy.check(url), private(host), "{url}");
        }
        assert_eq!(
            policy
                .check("http://10.0.0.5/a.png")
                .unwrap_err()
                .to_string(),
            "image URL host `10.0.0.5` is a private address; the gateway does not let the model \
             server fetch from its own network"
        );
    }

    #[test]
    fn boundaries_of_private_ranges_are_public() {
        let policy = ImageUrlPolicy::default();
        for url in [
            "http://172.15.255.255/",
            "http://172.32.0.1/",
            "http://100.63.255.255/",
            "http://100.128.0.1/",
            "http://169.253.1.1/",
            "http://11.0.0.1/",
            "http://192.169.0.1/",
            "http://[::ffff:8.8.8.8]/",
            "http://[64:ff9b::808:808]/",
            "http://[2002:808:808::1]/",
            "http://[fbff::1]/",
            "http://localhost.example.com/",
            "http://internal.example.com/",
        ] {
            assert_eq!(policy.check(url), Ok(None), "{url}");
        }
    }

    #[test]
    fn non_special_schemes_get_the_same_host_parsing() {
        // The url crate keeps `gopher://2130706433/` as an opaque name; the policy must not.
        let policy = ImageUrlPolicy {
            allowed_schemes: vec!["gopher".into()],
            ..ImageUrlPolicy::default()
        };
        assert_eq!(policy.check("gopher://2130706433/_x"), private("127.0.0.1"));
        assert_eq!(policy.check("gopher://example.com/_x"), Ok(None));
    }

    #[test]
    fn parser_confusion_is_refused() {
        let policy = ImageUrlPolicy::default();
        for url in [
            "http://evil.example\\@127.0.0.1/",
            "http://example.com\t/",
            " http://example.com/",
            "http://example.com/a b.png",
            "http://exa\nmple.com/",
            "http://user:pass@example.com/",
            "http://example.com:80@10.0.0.1/",
            "http://@10.0.0.1@example.com/",
            "https://",
            "http://[fe80::1%25eth0]/",
            "http://1.2.3.4.5/",
            "http://256.0.0.1/",
            "not a url",
            "//example.com/a.png",
            "/a.png",
            "",
        ] {
            assert!(
                matches!(policy.check(url), Err(ImagePolicyError::Malformed(_))),
                "{url:?} -> {:?}",
                policy.check(url)
            );
        }
        let too_long = format!("http://{}.example.com/", "a.".repeat(200));
        assert!(matches!(
            policy.check(&too_long),
            Err(ImagePolicyError::Malformed(_))
        ));
    }

    #[test]
    fn allowed_hosts() {
        let policy = ImageUrlPolicy {
            allowed_hosts: vec![
                "*.example.com".into(),
                "CDN.Other.org.".into(),
                "93.184.215.14".into(),
                "2606:4700::1111".into(),
            ],
            ..ImageUrlPolicy::default()
        };
        for url in [
            "https://img.example.com/a.png",
            "https://a.b.EXAMPLE.com./a.png",
            "https://cdn.other.org/a.png",
            "http://93.184.215.14/a.png",
            "http://[2606:4700::1111]/a.png",
            "data:image/png;base64,AAAA",
        ] {
            assert!(policy.check(url).is_ok(), "{url}");
        }
        for (url, host) in [
            ("https://example.com/a.png", "example.com"),
            ("https://evilexample.com/a.png", "evilexample.com"),
            ("https://example.com.evil.net/a.png", "example.com.evil.net"),
            ("https://www.other.org/a.png", "www.other.org"),
            ("http://93.184.215.15/a.png", "93.184.215.15"),
        ] {
            assert_eq!(
                policy.check(url),
                Err(ImagePolicyError::HostNotAllowed { host: host.into() }),
                "{url}"
            );
        }
        assert_eq!(
            policy.check("https://evil.net/").unwrap_err().to_string(),
            "image URL host `evil.net` is not in this gateway's list of allowed image hosts"
        );
        // Listing a private host narrows the list; it does not lift the private-host check.
        let internal = ImageUrlPolicy {
            allowed_hosts: vec!["images.internal".into(), "[fd00::7]".into()],
            ..ImageUrlPolicy::default()
        };
        assert_eq!(
            internal.check("http://images.internal/a"),
            private("images.internal")
        );
        let internal = ImageUrlPolicy {
            allow_private_hosts: true,
            ..internal
        };
        assert_eq!(internal.check("http://images.internal/a"), Ok(None));
        assert_eq!(internal.check("http://[fd00::7]/a"), Ok(None));
        assert!(matches!(
            internal.check("http://10.0.0.1/a"),
            Err(ImagePolicyError::HostNotAllowed { .. })
        ));
        // Entries that are not hosts match nothing rather than everything.
        let nonsense = ImageUrlPolicy {
            allowed_hosts: vec!["".into(), "*.".into(), "*".into(), "a b".into()],
            ..ImageUrlPolicy::default()
        };
        assert!(nonsense.check("https://example.com/").is_err());
    }

    #[test]
    fn allow_private_hosts_lets_them_through() {
        let policy = ImageUrlPolicy {
            allow_private_hosts: true,
            ..ImageUrlPolicy::default()
        };
        for url in [
            "http://localhost:8000/a.png",
            "http://127.0.0.1/a.png",
            "http://[::1]/a.png",
            "http://10.1.2.3/a.png",
            "http://172.16.0.1/a.png",
            "http://192.168.0.1/a.png",
            "http://169.254.169.254/a.png",
            "http://100.64.0.1/a.png",
            "http://[fc00::1]/a.png",
            "http://[fe80::1]/a.png",
            "http://[::ffff:127.0.0.1]/a.png",
            "http://2130706433/a.png",
            "http://0x7f.1/a.png",
        ] {
            assert_eq!(policy.check(url), Ok(None), "{url}");
        }
        // Schemes are still enforced.
        assert!(policy.check("file:///etc/passwd").is_err());
    }

    #[test]
    fn error_messages_do_not_echo_megabytes() {
        let scheme = "a".repeat(1 << 20);
        let err = ImageUrlPolicy::default()
            .check(&format!("{scheme}://x"))
            .unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
        let mime = "x".repeat(1000);
        let err = read_data_url(&format!("data:text/{mime};base64,AAAA")).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn policy_deserializes_with_defaults_and_rejects_unknown_fields() {
        use serde::Deserialize;
        use serde::de::value::{Error, MapDeserializer};
        let from = |entries: Vec<(&'static str, bool)>| {
            ImageUrlPolicy::deserialize(MapDeserializer::<_, Error>::new(entries.into_iter()))
        };
        let policy = from(vec![("allow_private_hosts", true)]).unwrap();
        assert_eq!(
            policy,
            ImageUrlPolicy {
                allow_private_hosts: true,
                ..ImageUrlPolicy::default()
            }
        );
        assert!(from(vec![("allow_private_host", true)]).is_err());
    }

    #[test]
    fn media_types_come_from_magic_bytes() {
        for (bytes, mime) in [
            (png(1, 1), "image/png"),
            (gif(1, 1), "image/gif"),
            (webp_vp8x(1, 1), "image/webp"),
            (jpeg(0xC0, 1, 1).0, "image/jpeg"),
            (bmp(1, 1), "image/bmp"),
        ] {
            assert_eq!(image_media_type(&bytes), Some(mime));
        }
        assert_eq!(image_media_type(b"<!doctype html><html>"), None);
        assert_eq!(image_media_type(b""), None);
    }

    #[test]
    fn fetch_mode_takes_http_urls_and_refuses_other_schemes() {
        let off = ImageUrlPolicy::default();
        assert_eq!(off.fetches("https://example.com/a.png"), Ok(false));
        let on = ImageUrlPolicy {
            fetch: true,
            allowed_schemes: vec!["http".into(), "https".into(), "data".into(), "ftp".into()],
            ..ImageUrlPolicy::default()
        };
        assert_eq!(on.fetches("https://example.com/a.png"), Ok(true));
        assert_eq!(on.fetches("HTTP://example.com/a.png"), Ok(true));
        assert_eq!(on.fetches("data:image/png;base64,AAAA"), Ok(false));
        assert_eq!(
            on.fetches("ftp://example.com/a.png"),
            Err(ImagePolicyError::NotFetchable {
                scheme: "ftp".into()
            })
        );
    }

    // --- token estimate -------------------------------------------------------------------------

    #[test]
    fn token_estimate_examples() {
        assert_eq!(estimate_image_tokens(None), 256);
        assert_eq!(estimate_image_tokens(size(1, 1)), 64);
        assert_eq!(estimate_image_tokens(size(0, 0)), 64);
        assert_eq!(estimate_image_tokens(size(224, 224)), 64);
        assert_eq!(estimate_image_tokens(size(280, 280)), 100);
        assert_eq!(estimate_image_tokens(size(281, 280)), 110); // partial patches count
        assert_eq!(estimate_image_tokens(size(1456, 1456)), 52 * 52);
        assert_eq!(estimate_image_tokens(size(4000, 3000)), 52 * 39); // -> 1456×1092
        assert_eq!(estimate_image_tokens(size(u32::MAX, u32::MAX)), 52 * 52);
        assert_eq!(estimate_image_tokens(size(u32::MAX, 1)), 64);
    }

    #[test]
    fn token_estimate_is_not_monotone_in_the_longer_side_past_the_cap() {
        // Documented behaviour of "scale the longer side to 1456, keep aspect": widening an
        // already-large image shrinks its height after scaling, so fewer patches.
        let square = estimate_image_tokens(size(2000, 2000));
        let wider = estimate_image_tokens(size(4000, 2000));
        assert_eq!((square, wider), (2704, 52 * 26));
    }

    // --- properties -----------------------------------------------------------------------------

    fn valid_encodings() -> Vec<Vec<u8>> {
        vec![
            png(10, 20),
            gif(10, 20),
            webp_vp8x(10, 20),
            webp_vp8l(10, 20),
            webp_vp8(10, 20),
            jpeg(0xC0, 10, 20).0,
            jpeg(0xC2, 10, 20).0,
            bmp(10, 20),
        ]
    }

    proptest! {
        #[test]
        fn image_size_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Some(s) = image_size(&bytes) {
                prop_assert!(s.width > 0 && s.height > 0);
            }
        }

        #[test]
        fn image_size_never_panics_behind_a_real_magic(
            which in 0usize..8,
            tail in proptest::collection::vec(any::<u8>(), 0..512),
            keep in 0usize..40,
        ) {
            let mut bytes = valid_encodings()[which].clone();
            bytes.truncate(keep.min(bytes.len()).max(2));
            bytes.extend(tail);
            let _ = image_size(&bytes);
        }

        #[test]
        fn image_size_survives_corruption(
            which in 0usize..8,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = valid_encodings()[which].clone();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Some(s) = image_size(&bytes) {
                prop_assert!(s.width > 0 && s.height > 0);
            }
        }

        #[test]
        fn read_data_url_never_panics(s in any::<String>()) {
            let _ = read_data_url(&s);
            let _ = read_data_url(&format!("data:{s}"));
        }

        #[test]
        fn base64_image_data_urls_always_parse(s in "[ -~]{0,2000}") {
            let got = read_data_url(&format!("data:image/png;base64,{s}"));
            prop_assert!(got.is_ok());
        }

        #[test]
        fn check_never_panics(s in any::<String>(), host in "[a-z0-9.:\\[\\]%@-]{0,40}") {
            let open = ImageUrlPolicy {
                allowed_schemes: vec!["http".into(), "gopher".into(), "file".into(), "data".into()],
                allowed_hosts: vec!["*.example.com".into(), host.clone()],
                allow_private_hosts: false,
                ..ImageUrlPolicy::default()
            };
            let _ = open.name_to_resolve(&s);
            let _ = open.name_to_resolve(&format!("http://{host}/x"));
            let _ = ImageUrlPolicy::default().check(&s);
            let _ = open.check(&s);
            let _ = open.check(&format!("http://{host}/x"));
            let _ = open.check(&format!("gopher://{host}/x"));
        }

        #[test]
        fn estimate_is_bounded_and_symmetric(w in any::<u32>(), h in any::<u32>()) {
            let t = estimate_image_tokens(size(w, h));
            prop_assert!((64..=4096).contains(&t));
            prop_assert_eq!(t, estimate_image_tokens(size(h, w)));
        }

        #[test]
        fn estimate_is_monotone_where_the_formula_is(
            w in any::<u32>(), h in any::<u32>(), grow in any::<u32>(),
        ) {
            // Growing a side never lowers the estimate while that side does not become the
            // longer side above the 1456 px cap (past it, see the test above).
            let limit = h.max(1456);
            let w2 = w.saturating_add(grow).min(limit.max(w));
            prop_assert!(
                estimate_image_tokens(size(w2, h)) >= estimate_image_tokens(size(w, h)),
                "({w},{h}) -> ({w2},{h})"
            );
            // Scaling the whole image up never lowers it either.
            let k = u64::from(grow % 8) + 1;
            if let (Ok(kw), Ok(kh)) = (u32::try_from(u64::from(w) * k), u32::try_from(u64::from(h) * k)) {
                prop_assert!(estimate_image_tokens(size(kw, kh)) >= estimate_image_tokens(size(w, h)));
            }
        }

        #[test]
        fn estimate_is_monotone_below_the_cap(
            w in 0u32..=1456, h in 0u32..=1456, dw in 0u32..=1456, dh in 0u32..=1456,
        ) {
            let (w2, h2) = ((w + dw).min(1456), (h + dh).min(1456));
            prop_assert!(estimate_image_tokens(size(w2, h2)) >= estimate_image_tokens(size(w, h)));
        }
    }
}
