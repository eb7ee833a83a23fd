//! Guards on what an HTTP server may do to envrender. A Consul agent or a
//! Vault server is trusted with a token, not with envrender's memory, its
//! schedule or the token's destination:
//!
//! - answers are read up to a size limit ([`read_answer`]), so a huge or
//!   endless body fails with an error naming the limit instead of growing
//!   the process past its container's memory;
//! - redirects never carry a token off the configured origin or off https
//!   ([`vault_redirects`]; Consul follows none);
//! - `Retry-After` is read and clamped ([`retry_after`]);
//! - an address's `user:password@` is never printed ([`redacted`]).

use std::fmt;
use std::time::{Duration, SystemTime};

use reqwest::Url;

use super::{ErrorKind, FetchError};

/// The longest `Retry-After` honoured: a server asking for more is waited
/// on for this long, then asked again.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// Default limits on one answer. Consul's recursive reads of a large prefix
/// are the biggest answers envrender asks for (100,000 keys of ~100 bytes
/// are about 25 MB of JSON); a Vault secret is rarely over a megabyte.
pub const CONSUL_MAX_ANSWER: u64 = 64 << 20;
/// The default for Vault (`[vault] max_answer_size`): 16 MiB.
pub const VAULT_MAX_ANSWER: u64 = 16 << 20;

/// A backend's answer, read within its limit: its `Retry-After` (on a 429
/// or 503) and its body. A `Content-Length` over the limit is refused
/// before anything is read; a body without one is read chunk by chunk and
/// abandoned as soon as it passes the limit, so at most `limit` bytes (plus
/// one chunk) are held. Too large is an error naming the limit and
/// `setting`; a connection cut while reading is transient.
pub async fn read_answer(
    mut response: reqwest::Response,
    limit: u64,
    backend: &'static str,
    action: &str,
    setting: &str,
) -> Result<(Option<Duration>, Vec<u8>), FetchError> {
    let waited = matches!(response.status().as_u16(), 429 | 503)
        .then(|| retry_after(response.headers()))
        .flatten();
    let too_large = || {
        FetchError::new(
            ErrorKind::Invalid,
            backend,
            action,
            format!("the answer is larger than the limit of {}", Size(limit)),
        )
        .hint(format!(
            "raise {setting} (e.g. \"{}\") if answers this large are expected",
            Size(limit.saturating_mul(2))
        ))
    };
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    // What the server announces is not reserved beyond a megabyte.
    let reserve = response
        .content_length()
        .unwrap_or(0)
        .min(limit)
        .min(1 << 20);
    let mut body = Vec::with_capacity(reserve as usize);
    loop {
        let chunk = response.chunk().await.map_err(|e| {
            FetchError::new(
                ErrorKind::Transient,
                backend,
                action,
                format!("reading the answer failed: {}", super::error_chain(&e)),
            )
        })?;
        let Some(chunk) = chunk else { break };
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok((waited, body))
}

/// `Retry-After` as seconds or an HTTP date, clamped to
/// [`MAX_RETRY_AFTER`]; `None` when absent or unreadable.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let text = text.trim();
    let wait = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds.min(MAX_RETRY_AFTER.as_secs())),
        Err(_) => httpdate::parse_http_date(text)
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// A byte count as people write it: `64 MiB`, `512 KiB`, `100 bytes`.
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if n >= 1 << shift && n.is_multiple_of(1 << shift) {
                return write!(f, "{} {unit}", n >> shift);
            }
        }
        write!(f, "{n} bytes")
    }
}

/// A URL as it may be printed: with a `user:password@`, only the scheme,
/// `***@` and the host and port (a password may hold `/` or `@`, so
/// nothing after the host is shown either).
pub fn redacted(url: &Url) -> String {
    if url.username().is_empty() && url.password().is_none() {
        return url.to_string();
    }
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "{}://***@{}{port}/",
        url.scheme(),
        url.host_str().unwrap_or_default()
    )
}

/// An address as it may be printed, for text that may not parse as a URL:
/// everything up to its last `@` (a password may hold `/`, `#`, `?` or
/// `@`) is hidden, but the scheme.
pub fn redacted_text(address: &str) -> String {
    let (scheme, rest) = match address.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), address),
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}***{}", &rest[at..]),
        None => address.to_string(),
    }
}

/// Refuses an address whose path or query holds an `@`: a password with an
/// unencoded `/`, `?` or `#` ends the authority early, and the rest of it
/// would be sent (and printed) as a path. The error does not repeat it.
pub fn check_userinfo(what: &str, url: &Url) -> Result<(), String> {
    let after_host = format!("{}{}", url.path(), url.query().unwrap_or_default());
    if after_host.contains('@') {
        return Err(format!(
            "the {what} address has an '@' after its host: percent-encode a '/', '?' or '#' in its password (%2F, %3F, %23)"
        ));
    }
    Ok(())
}

/// `scheme://host:port`, the origin a token is bound to.
fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// Vault's redirect policy. Vault standbys redirect clients to the active
/// node (307); envrender follows a redirect only while it stays on the
/// configured origin (scheme, host and port) or goes to one listed in
/// `[vault] redirect_origins`, and never from https to http. The refusal
/// names the `Location` and the setting. A token, a `secret_id` or a JWT
/// in the request would otherwise go wherever the server pointed.
pub fn vault_redirects(base: &Url, allowed: Vec<String>) -> reqwest::redirect::Policy {
    let home = origin(base);
    let https = base.scheme() == "https";
    reqwest::redirect::Policy::custom(move |attempt| {
        let to = attempt.url();
        let leaves_https = (https || attempt.previous().iter().any(|u| u.scheme() == "https"))
            && to.scheme() != "https";
        let elsewhere = origin(to) != home && !allowed.contains(&origin(to));
        if leaves_https {
            let shown = redacted(to);
            attempt.error(format!(
                "Vault redirected to {shown}, which is not https; not followed (the token would cross the network unencrypted)"
            ))
        } else if elsewhere {
            let shown = redacted(to);
            let allow = origin(to);
            attempt.error(format!(
                "Vault redirected to {shown}, another origin than {home}; not followed (the token would go with it). If it is a node of this Vault cluster, allow it with [vault] redirect_origins = [\"{allow}\"], or set VAULT_ADDR to the active node"
            ))
        } else if attempt.previous().len() > 5 {
            attempt.error("Vault redirected more than 5 times; not followed")
        } else {
            attempt.follow()
        }
    })
}

/// An origin as `[vault] redirect_origins` lists it: `https://host:port`
/// (the port may be left out for the scheme's own).
pub fn parse_origin(text: &str) -> Result<String, String> {
    let url = Url::parse(text.trim())
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
        .ok_or_else(|| format!("\"{text}\" is not an origin such as https://vault-2:8200"))?;
    if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
        return Err(format!(
            "\"{text}\" is not an origin: write only scheme, host and port, such as https://vault-2:8200"
        ));
    }
    Ok(origin(&url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_as_people_write_them() {
        assert_eq!(Size(64 << 20).to_string(), "64 MiB");
        assert_eq!(Size(1000).to_string(), "1000 bytes");
    }

    #[test]
    fn retry_after_is_read_and_clamped() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after", "18446744073709551615".parse().unwrap());
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn credentials_in_addresses_are_hidden() {
        let url = Url::parse("https://admin:hunter2@vault:8200/").unwrap();
        assert_eq!(redacted(&url), "https://***@vault:8200/");
        let plain = Url::parse("http://consul:8500/").unwrap();
        assert_eq!(redacted(&plain), "http://consul:8500/");
        assert_eq!(
            redacted_text("admin:hunter2@consul:8500"),
            "***@consul:8500"
        );
        assert_eq!(redacted_text("https://a:b@vault/x@y"), "https://***@y");
        assert_eq!(redacted_text("u:p#w@host:8500"), "***@host:8500");
        let odd = Url::parse("https://u:p@ss/w0rd@vault:8200/").unwrap();
        assert!(!redacted(&odd).contains("w0rd"), "{}", redacted(&odd));
        assert_eq!(redacted_text("consul:8500"), "consul:8500");
    }

    #[test]
    fn origins() {
        assert_eq!(
            parse_origin("https://vault-2:8200").unwrap(),
            "https://vault-2:8200"
        );
        assert_eq!(
            parse_origin("https://vault-2:443/").unwrap(),
            "https://vault-2"
        );
        assert!(parse_origin("https://vault-2:8200/v1").is_err());
        assert!(parse_origin("vault-2:8200").is_err());
    }
}
