//! Fetch mode (`image_policy.fetch`): the gateway fetches image URLs itself, before the
//! call is admitted, and the model server is sent the images inline as `data:` URLs, so it
//! fetches nothing and never sees a URL.
//!
//! Each hop is checked as the first URL was: the URL's text against the policy, then its
//! name resolved once, within [`RESOLVE_TIMEOUT`], to addresses that must all be public
//! (unless `allow_private_hosts`); the connection is made to those addresses and no other
//! (`upstream::fetch::PinnedGet`), so a name cannot answer the check with one address and
//! the connection with another. Redirects are followed by hand, at most
//! `fetch_max_redirects`, each checked again. The body is capped in bytes; it must start
//! with the magic bytes of an image format `core::images` reads, and its header's width ×
//! height must be within `fetch_max_pixels`. All of it within `fetch_timeout_ms`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::future::BoxFuture;
use url::{Host, Url};

use super::image_hosts::{RESOLVE_TIMEOUT, resolve_checked, system_resolve};
use crate::core::GatewayError;
use crate::core::images::{ImageUrlPolicy, image_media_type, image_size};
use crate::core::request::ImageToFetch;
use crate::upstream::fetch::{PinnedAnswer, PinnedGet};

/// What the image servers are asked for.
const ACCEPT: &str = "image/png, image/jpeg, image/gif, image/webp, image/bmp";

/// Resolves a host name to its addresses.
type Resolve = Arc<dyn Fn(String) -> BoxFuture<'static, Result<Vec<IpAddr>, String>> + Send + Sync>;

/// Fetches the images of fetch mode; one for the process.
pub struct ImageFetcher {
    policy: ImageUrlPolicy,
    get: PinnedGet,
    resolve: Resolve,
}

impl ImageFetcher {
    /// With the system's resolver. Fails when the platform's trust store cannot be loaded.
    pub fn new(policy: ImageUrlPolicy) -> Result<Self, String> {
        Self::with_resolver(
            policy,
            |host: String| -> BoxFuture<'static, Result<Vec<IpAddr>, String>> {
                Box::pin(system_resolve(host))
            },
        )
    }

    fn with_resolver<F>(policy: ImageUrlPolicy, resolve: F) -> Result<Self, String>
    where
        F: Fn(String) -> BoxFuture<'static, Result<Vec<IpAddr>, String>> + Send + Sync + 'static,
    {
        Ok(ImageFetcher {
            policy,
            get: PinnedGet::new()?,
            resolve: Arc::new(resolve),
        })
    }

    /// Each image fetched (all at once), as the `data:` URL to send in its place; the
    /// first image refused refuses the call, naming its field.
    pub async fn fetch_all(
        &self,
        images: &[ImageToFetch],
    ) -> Result<Vec<(ImageToFetch, String)>, GatewayError> {
        let fetches = images.iter().map(|image| async move {
            match self.fetch(&image.url).await {
                Ok(data_url) => Ok((image.clone(), data_url)),
                Err(reason) => Err(GatewayError::invalid_request(
                    format!("the gateway could not use the image at this URL: {reason}"),
                    Some(&image.param),
                )),
            }
        });
        futures_util::future::try_join_all(fetches).await
    }

    /// One image as a `data:` URL, or why not (for the API user).
    async fn fetch(&self, url: &str) -> Result<String, String> {
        let timeout = Duration::from_millis(self.policy.fetch_timeout_ms);
        tokio::time::timeout(timeout, self.follow(url))
            .await
            .map_err(|_| format!("no image within {} ms", timeout.as_millis()))?
    }

    async fn follow(&self, url: &str) -> Result<String, String> {
        let mut url = url.to_owned();
        for hop in 0..=self.policy.fetch_max_redirects {
            let checked = self
                .check(&url)
                .and_then(|()| Url::parse(&url).map_err(|e| format!("malformed image URL: {e}")));
            let parsed = match checked {
                Ok(parsed) => parsed,
                Err(reason) if hop > 0 => return Err(format!("it redirects: {reason}")),
                Err(reason) => return Err(reason),
            };
            let addrs = self.addresses(&parsed).await?;
            match self
                .get
                .get(&url, &addrs, self.policy.fetch_max_bytes, ACCEPT)
                .await?
            {
                PinnedAnswer::Redirect(location) => {
                    url = parsed
                        .join(&location)
                        .map_err(|e| format!("it redirects to a malformed URL: {e}"))?
                        .to_string();
                }
                PinnedAnswer::Body(bytes) => return self.inline(&bytes),
            }
        }
        Err(format!(
            "it redirects more than {} times",
            self.policy.fetch_max_redirects
        ))
    }

    /// The policy's text check, and a scheme the gateway fetches.
    fn check(&self, url: &str) -> Result<(), String> {
        self.policy.check(url).map_err(|e| e.to_string())?;
        match self.policy.fetches(url).map_err(|e| e.to_string())? {
            true => Ok(()),
            false => Err("it is not an http or https URL".into()),
        }
    }

    /// Where a connection to `url` may go: its name's addresses, checked; none for an
    /// address literal, which the text check judged and which is connected to as it is.
    async fn addresses(&self, url: &Url) -> Result<Vec<IpAddr>, String> {
        match url.host() {
            Some(Host::Domain(name)) => {
                let name = name.strip_suffix('.').unwrap_or(name);
                resolve_checked(
                    name,
                    RESOLVE_TIMEOUT,
                    &|host: String| (self.resolve)(host),
                    self.policy.allow_private_hosts,
                )
                .await
                .map_err(|e| e.to_string())
            }
            Some(Host::Ipv4(_) | Host::Ipv6(_)) => Ok(Vec::new()),
            None => Err("image URL has no host".into()),
        }
    }

    /// The body as a `data:` URL, if it is an image within the pixel cap.
    fn inline(&self, bytes: &[u8]) -> Result<String, String> {
        let media_type = image_media_type(bytes)
            .ok_or("it is not an image the gateway reads (PNG, JPEG, GIF, WebP or BMP)")?;
        let size = image_size(bytes).ok_or("its header gives no size")?;
        let pixels = u64::from(size.width) * u64::from(size.height);
        if pixels > self.policy.fetch_max_pixels {
            return Err(format!(
                "it is {}×{} pixels, over the {} pixels allowed",
                size.width, size.height, self.policy.fetch_max_pixels
            ));
        }
        Ok(format!(
            "data:{media_type};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A 4×3 PNG header: all the gateway reads of an image.
    fn png() -> Vec<u8> {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend(4u32.to_be_bytes());
        png.extend(3u32.to_be_bytes());
        png.extend([8, 6, 0, 0, 0, 0, 0, 0, 0]);
        png
    }

    async fn image_server() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new().route("/a.png", axum::routing::get(|| async { png() }));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        port
    }

    fn policy(allow_private_hosts: bool) -> ImageUrlPolicy {
        ImageUrlPolicy {
            fetch: true,
            allow_private_hosts,
            ..ImageUrlPolicy::default()
        }
    }

    /// A resolver that answers `first` once, then `later`, counting its calls.
    fn changing_resolver(
        first: &'static str,
        later: &'static str,
        calls: Arc<AtomicUsize>,
    ) -> impl Fn(String) -> BoxFuture<'static, Result<Vec<IpAddr>, String>> + Send + Sync {
        move |_: String| -> BoxFuture<'static, Result<Vec<IpAddr>, String>> {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let addr = if n == 0 { first } else { later };
            Box::pin(async move {
                Ok(addr
                    .split(',')
                    .map(|a| a.parse().unwrap())
                    .collect::<Vec<IpAddr>>())
            })
        }
    }

    #[tokio::test]
    async fn a_name_is_resolved_once_and_connected_to_where_it_pointed() {
        let port = image_server().await;
        let calls = Arc::new(AtomicUsize::new(0));
        // `img.test` exists only in this resolver; its second answer could not be reached.
        let resolve = changing_resolver("127.0.0.1", "10.255.255.1", calls.clone());
        let fetcher = ImageFetcher::with_resolver(policy(true), resolve).unwrap();
        let data_url = fetcher
            .fetch(&format!("http://img.test:{port}/a.png"))
            .await
            .unwrap();
        let expected = base64::engine::general_purpose::STANDARD.encode(png());
        assert_eq!(data_url, format!("data:image/png;base64,{expected}"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_name_with_one_private_answer_is_refused_before_any_connection() {
        let calls = Arc::new(AtomicUsize::new(0));
        let resolve = changing_resolver(
            "93.184.216.34,169.254.169.254",
            "169.254.169.254",
            calls.clone(),
        );
        let fetcher = ImageFetcher::with_resolver(policy(false), resolve).unwrap();
        let refused = fetcher
            .fetch("http://rebind.example/a.png")
            .await
            .unwrap_err();
        assert!(
            refused.contains("rebind.example") && refused.contains("169.254.169.254"),
            "{refused}"
        );
        let images = [ImageToFetch::for_test(
            "http://rebind.example/a.png",
            "messages[0].content[0].image_url.url",
        )];
        match fetcher.fetch_all(&images).await.unwrap_err() {
            GatewayError::InvalidRequest { param, .. } => {
                assert_eq!(
                    param.as_deref(),
                    Some("messages[0].content[0].image_url.url")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
