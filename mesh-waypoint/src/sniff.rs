//! Protocol sniffing for ports that declare none (no `appProtocol`, no known name
//! prefix), as Istio's does: HTTP when a connection opens with an HTTP/1.x request
//! line or the HTTP/2 connection preface, else TCP. The verdict waits for as many
//! bytes as it needs (a request line may come in pieces), never more.

/// The HTTP/2 connection preface (RFC 9113, 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// What a request line's version starts with.
const HTTP1: &[u8] = b"HTTP/1.";
/// The longest request line waited for; a longer first line is taken for another
/// protocol.
pub const MAX_LINE: usize = 16 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    Http,
    Other,
    /// Too few bytes to tell yet.
    NeedMore,
}

/// What the first bytes of a connection say: an HTTP/1.x request line is `method SP
/// request-target SP "HTTP/1."` (the method a token, the target without spaces or
/// control bytes), which covers every method, registered or not.
pub fn sniff(first: &[u8]) -> Sniffed {
    let n = first.len().min(PREFACE.len());
    if first[..n] == PREFACE[..n] && n > 0 {
        // Also a prefix of a request line with the method "PRI"; the preface decides.
        return if n == PREFACE.len() { Sniffed::Http } else { Sniffed::NeedMore };
    }
    let Some(method_end) = first.iter().position(|&b| !is_tchar(b)) else {
        return more(first);
    };
    if method_end == 0 || first[method_end] != b' ' {
        return Sniffed::Other;
    }
    let rest = &first[method_end + 1..];
    let Some(target_end) = rest.iter().position(|&b| b <= b' ' || b == 0x7f) else {
        return more(first);
    };
    if target_end == 0 || rest[target_end] != b' ' {
        return Sniffed::Other;
    }
    let version = &rest[target_end + 1..];
    let n = version.len().min(HTTP1.len());
    if version[..n] != HTTP1[..n] {
        Sniffed::Other
    } else if n == HTTP1.len() {
        Sniffed::Http
    } else {
        more(first)
    }
}

fn more(first: &[u8]) -> Sniffed {
    if first.len() >= MAX_LINE { Sniffed::Other } else { Sniffed::NeedMore }
}

/// RFC 9110's `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn request_lines_and_the_preface_are_http() {
        for line in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /api?x=1 HTTP/1.0\r\n",
            b"PROPFIND /dav HTTP/1.1\r\n",
            b"M-SEARCH * HTTP/1.1\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\n",
            PREFACE,
        ] {
            assert_eq!(sniff(line), Sniffed::Http, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn other_protocols_are_not() {
        for first in [
            &b"\x16\x03\x01\x02\x00"[..], // TLS ClientHello
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"*1\r\n$4\r\nPING\r\n",             // Redis
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f", // PostgreSQL SSLRequest
            b"GETX\r\n",
            b"GET  / HTTP/1.1",
            b"GET / HTTP/2.0\r\n",
            b"GET / FTP/1.1\r\n",
            b"GET /a\x01b HTTP/1.1\r\n",
            b" GET / HTTP/1.1",
            b"PRI * HTTP/2.0\r\n\r\nXX",
        ] {
            assert_eq!(sniff(first), Sniffed::Other, "{}", String::from_utf8_lossy(first));
        }
    }

    #[test]
    fn a_request_line_in_pieces_waits_for_enough() {
        assert_eq!(sniff(b""), Sniffed::NeedMore);
        assert_eq!(sniff(b"GE"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GETX"), Sniffed::NeedMore, "a method of its own, maybe");
        assert_eq!(sniff(b"GET /long/pa"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GET /long/path HTTP/"), Sniffed::NeedMore);
        assert_eq!(sniff(b"PRI * HTTP/2"), Sniffed::NeedMore);
        let long = [b"GET /".as_slice(), &vec![b'a'; MAX_LINE]].concat();
        assert_eq!(sniff(&long), Sniffed::Other, "no end to the line in sight");
    }

    proptest! {
        /// Every proper prefix of a request line waits for more, the whole line is
        /// HTTP: the verdict never comes early or wrong.
        #[test]
        fn prefixes_of_a_request_line_wait(
            method in "[A-Z][A-Z_-]{0,11}",
            target in "/[!-~]{0,40}",
            minor in 0u8..2,
        ) {
            let line = format!("{method} {target} HTTP/1.{minor}\r\n");
            let line = line.as_bytes();
            let decided = line.len() - 2;
            prop_assert_eq!(sniff(&line[..decided]), Sniffed::Http);
            for end in 0..decided - 1 {
                let verdict = sniff(&line[..end]);
                prop_assert!(verdict == Sniffed::NeedMore, "{:?} at {}: {:?}", String::from_utf8_lossy(&line[..end]), end, verdict);
            }
        }

        /// Any bytes: a verdict, no panic; `Http` only with a request line's shape.
        #[test]
        fn any_bytes_get_a_verdict(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if sniff(&bytes) == Sniffed::Http {
                let text = String::from_utf8_lossy(&bytes);
                prop_assert!(text.starts_with("PRI * HTTP/2.0") || text.contains(" HTTP/1."), "{:?}", text);
            }
        }
    }
}
