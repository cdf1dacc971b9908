//! The HTTP side of a download, on `ureq` (the client `hf-hub` itself uses): every redirect is
//! followed here, hop by hop, so that each one is counted and bounded, and the token
//! (`Authorization: Bearer …`) goes only to the endpoint's own origin (scheme, host and port): a
//! redirect to another host (the hub's CDN, or anywhere a hostile hub points) gets no credentials,
//! as `huggingface_hub` and `requests` do. Timeouts: connecting, waiting for an answer and every
//! read are bounded by `HF_HUB_DOWNLOAD_TIMEOUT`.

use super::listing::shown;
use std::cell::Cell;
use std::time::Duration;
use ureq::http::{HeaderMap, Response, StatusCode, Uri};

/// Most redirects one request follows (as `requests`' default of 30, tightened: the hub uses one).
pub const MAX_HOPS: usize = 10;

/// Requests one download may send at most, plus [`REQUESTS_PER_FILE`] per file of the listing.
const BASE_REQUESTS: usize = 64;
/// See [`BASE_REQUESTS`].
pub const REQUESTS_PER_FILE: usize = 8;

/// Which redirects a request follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Only those that stay on the same origin (metadata: an off-origin redirect's headers are the
    /// answer, as `huggingface_hub` reads them).
    SameOrigin,
    /// Every redirect (a file's body, wherever it is stored).
    Any,
}

/// An answer: the response and the URL that gave it.
pub struct Answer {
    /// The response; its body unread.
    pub response: Response<ureq::Body>,
    /// The URL that answered.
    pub url: String,
}

impl Answer {
    /// A header's value as text, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(self.response.headers(), name)
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.response.status()
    }

    /// Where a redirect points, resolved against the URL that answered.
    pub fn location(&self) -> Result<Option<String>, String> {
        if !self.status().is_redirection() {
            return Ok(None);
        }
        let location = self
            .header("location")
            .ok_or_else(|| format!("the hub answered {} without a Location", self.status()))?;
        resolve(&self.url, location).map(Some)
    }
}

/// A header's value as text.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The client of one download.
pub struct Client {
    agent: ureq::Agent,
    endpoint: String,
    origin: Origin,
    token: Option<String>,
    sent: Cell<usize>,
    budget: Cell<usize>,
    stall: Duration,
}

/// Scheme, host and port of a URL: where a token may go.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    fn of(url: &str) -> Result<Origin, String> {
        let uri: Uri = url
            .parse()
            .map_err(|_| format!("`{}` is not a URL", shown(url)))?;
        let scheme = uri.scheme_str().unwrap_or_default().to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "https" => 443,
            "http" => 80,
            _ => return Err(format!("`{}` is not an http(s) URL", shown(url))),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("`{}` has no host", shown(url)))?
            .to_ascii_lowercase();
        Ok(Origin {
            scheme,
            host,
            port: uri.port_u16().unwrap_or(default_port),
        })
    }
}

/// `location` (absolute, scheme-relative, absolute-path or relative) resolved against `base`.
pub fn resolve(base: &str, location: &str) -> Result<String, String> {
    let location = location.trim();
    if location.chars().any(char::is_control) || location.is_empty() {
        return Err(format!("the hub redirected to `{}`", shown(location)));
    }
    let origin = Origin::of(base)?;
    let joined = if location.contains("://") {
        location.to_string()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("{}://{rest}", origin.scheme)
    } else {
        let root = format!("{}://{}:{}", origin.scheme, origin.host, origin.port);
        if location.starts_with('/') {
            format!("{root}{location}")
        } else {
            let path = base
                .parse::<Uri>()
                .map(|u| u.path().to_string())
                .unwrap_or_default();
            let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            format!("{root}{dir}/{location}")
        }
    };
    Origin::of(&joined)?;
    Ok(joined)
}

impl Client {
    /// A client for `endpoint` (`https://huggingface.co` or `HF_ENDPOINT`), sending `token` to it
    /// only, giving up on a silence of `stall`.
    pub fn new(endpoint: &str, token: Option<String>, stall: Duration) -> Result<Client, String> {
        let endpoint = endpoint.trim().trim_end_matches('/').to_string();
        let origin = Origin::of(&endpoint).map_err(|e| format!("HF_ENDPOINT: {e}"))?;
        let config = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .user_agent(concat!("surgery-convert/", env!("CARGO_PKG_VERSION")))
            // Sizes and hashes are of the bytes as stored: no transfer compression.
            .accept_encoding("identity")
            .timeout_connect(Some(stall))
            .timeout_recv_response(Some(stall))
            .timeout_per_read(Some(stall))
            .timeout_per_write(Some(stall))
            .build();
        Ok(Client {
            agent: config.into(),
            endpoint,
            origin,
            token,
            sent: Cell::new(0),
            budget: Cell::new(BASE_REQUESTS),
            stall,
        })
    }

    /// The endpoint, without a trailing `/`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Allows `files` more files' worth of requests.
    pub fn allow_files(&self, files: usize) {
        let more = files.saturating_mul(REQUESTS_PER_FILE);
        self.budget.set(self.budget.get().saturating_add(more));
    }

    /// `GET url` (with `Range: bytes=…` when `range`), following redirects as `follow` says, at
    /// most [`MAX_HOPS`] of them. Every status is an answer; transport failures are errors.
    pub fn get(&self, url: &str, range: Option<&str>, follow: Follow) -> Result<Answer, String> {
        let mut url = url.to_string();
        for _ in 0..=MAX_HOPS {
            let answer = self.send(&url, range)?;
            let Some(next) = answer.location()? else {
                return Ok(answer);
            };
            let same = Origin::of(&next)? == Origin::of(&url)?;
            if follow == Follow::SameOrigin && !same {
                return Ok(answer);
            }
            url = next;
        }
        Err(format!(
            "the hub redirected more than {MAX_HOPS} times (a redirect loop?)"
        ))
    }

    /// One request, counted against the budget.
    fn send(&self, url: &str, range: Option<&str>) -> Result<Answer, String> {
        if self.sent.get() >= self.budget.get() {
            return Err(format!(
                "the hub needed more than {} requests for this repo; giving up",
                self.budget.get()
            ));
        }
        self.sent.set(self.sent.get() + 1);
        let mut request = self.agent.get(url);
        if let Some(range) = range {
            request = request.header("Range", range);
        }
        if let Some(token) = &self.token {
            if Origin::of(url)? == self.origin {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
        }
        let response = request.call().map_err(|e| self.transport(e))?;
        Ok(Answer {
            response,
            url: url.to_string(),
        })
    }

    /// A transport error in words; a timeout names `HF_HUB_DOWNLOAD_TIMEOUT`.
    pub fn transport(&self, e: ureq::Error) -> String {
        match e {
            ureq::Error::Timeout(_) => self.stalled(),
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => self.stalled(),
            other => format!("request error: {other}"),
        }
    }

    /// The message of a stalled transfer.
    pub fn stalled(&self) -> String {
        format!(
            "the Hugging Face hub sent nothing for {:.0} s (a stalled server or network); try again, or raise HF_HUB_DOWNLOAD_TIMEOUT",
            self.stall.as_secs_f64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_against_the_answering_url() {
        let base = "http://127.0.0.1:8080/org/name/resolve/main/config.json";
        assert_eq!(
            resolve(base, "/cdn/x").unwrap(),
            "http://127.0.0.1:8080/cdn/x"
        );
        assert_eq!(
            resolve(base, "other.json").unwrap(),
            "http://127.0.0.1:8080/org/name/resolve/main/other.json"
        );
        assert_eq!(
            resolve(base, "https://cdn.example/a?b=c").unwrap(),
            "https://cdn.example/a?b=c"
        );
        assert_eq!(resolve(base, "//h:1/p").unwrap(), "http://h:1/p");
        for bad in ["", "file:///etc/passwd", "ftp://x/y", "/a\r\nX: y"] {
            assert!(resolve(base, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        let o = |u: &str| Origin::of(u).unwrap();
        assert_eq!(o("https://HF.co/a"), o("https://hf.co:443/b"));
        assert_ne!(o("https://hf.co/a"), o("http://hf.co/a"));
        assert_ne!(o("http://127.0.0.1:1/a"), o("http://127.0.0.1:2/a"));
        assert_ne!(o("http://127.0.0.1:1/a"), o("http://localhost:1/a"));
    }
}
