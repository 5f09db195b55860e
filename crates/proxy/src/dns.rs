//! DNS over UDP, as far as the proxy needs it: the question of a query (to
//! log it and to check `dns` rules), the id and response code of an answer
//! (to log the outcome), and a local answer for a denied query.
//!
//! Queries are parsed whole with `simple-dns` (every section, not only the
//! question): a query the proxy cannot read completely is one it cannot vouch
//! for, and is treated as naming no name (see `policy.rs`). simple-dns
//! refuses question types it does not know, which are legal (RFC 3597): the
//! question section is walked here first, and such a type is read as `A`
//! for the parser's sake and logged as `TYPE<n>`. Answers are only read for
//! their header (id, response code), so an answer with record types the
//! parser does not know is still relayed and logged. A denied query's answer
//! is the query's own header and question section, byte for byte (the
//! client's letter case included, which resolvers using 0x20 randomisation
//! check), with the answer's flags and code.

use simple_dns::{Packet, PacketFlag, OPCODE, QTYPE, RCODE, TYPE};

/// The size of the DNS header, in front of every message.
const HEADER: usize = 12;

/// The question of a query the proxy read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The message id the answer carries back.
    pub id: u16,
    /// The names asked for, lowercase, without the final dot (one, in all
    /// but exotic queries).
    pub names: Vec<String>,
    /// The first question's type, as a mnemonic (`A`, `AAAA`, `TYPE65534`).
    pub qtype: String,
}

/// Why a datagram sent to port 53 is not a query the proxy can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Shorter than the 12-byte header.
    #[error("truncated DNS message: {0} bytes, under the 12-byte header")]
    Short(usize),
    /// The QR bit says it is an answer, not a query.
    #[error("a DNS response sent as a query")]
    Response,
    /// Not a standard query (an UPDATE, a NOTIFY, ...).
    #[error("a DNS {0:?} message, not a standard query")]
    Opcode(String),
    /// No question at all.
    #[error("a DNS query without a question")]
    NoQuestion,
    /// The sections do not parse (truncated, bad labels or pointers).
    #[error("malformed DNS query: {0}")]
    Parse(String),
}

/// Where the question section ends, and where each question's type is:
/// each name is walked label by label (a compression pointer ends it and
/// must point backwards). `None` when the section runs past the message or
/// holds a label the wire format does not allow.
fn questions(bytes: &[u8]) -> Option<(usize, Vec<usize>)> {
    let count = u16::from_be_bytes([*bytes.get(4)?, *bytes.get(5)?]);
    let mut at = HEADER;
    let mut types = Vec::with_capacity(usize::from(count).min(16));
    for _ in 0..count {
        loop {
            let len = *bytes.get(at)?;
            match len {
                0 => {
                    at += 1;
                    break;
                }
                1..=63 => at += 1 + usize::from(len),
                0xc0..=0xff => {
                    let target =
                        usize::from(u16::from_be_bytes([len, *bytes.get(at + 1)?]) & 0x3fff);
                    if target >= at {
                        return None;
                    }
                    at += 2;
                    break;
                }
                _ => return None,
            }
        }
        bytes.get(at..at + 4)?;
        types.push(at);
        at += 4;
    }
    Some((at, types))
}

/// Reads a query. Every section must parse: see the module comment.
pub fn parse_query(bytes: &[u8]) -> Result<Query, Malformed> {
    if bytes.len() < HEADER {
        return Err(Malformed::Short(bytes.len()));
    }
    let (_, types) = questions(bytes)
        .ok_or_else(|| Malformed::Parse("the question section is truncated or malformed".into()))?;
    let type_at = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
    // Types simple-dns refuses, read as A (1) in a copy.
    let unknown = |at: &usize| QTYPE::try_from(type_at(*at)).is_err();
    let patched;
    let readable = if types.iter().any(unknown) {
        let mut copy = bytes.to_vec();
        for at in types.iter().filter(|at| unknown(at)) {
            copy[*at..*at + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        patched = copy;
        &patched[..]
    } else {
        bytes
    };
    let packet = Packet::parse(readable).map_err(|e| Malformed::Parse(e.to_string()))?;
    if packet.has_flags(PacketFlag::RESPONSE) {
        return Err(Malformed::Response);
    }
    if packet.opcode() != OPCODE::StandardQuery {
        return Err(Malformed::Opcode(format!("{:?}", packet.opcode())));
    }
    let first = packet.questions.first().ok_or(Malformed::NoQuestion)?;
    Ok(Query {
        id: packet.id(),
        names: packet
            .questions
            .iter()
            .map(|q| q.qname.to_string().to_ascii_lowercase())
            .collect(),
        qtype: match types.first() {
            Some(at) if unknown(at) => format!("TYPE{}", type_at(*at)),
            _ => qtype_name(first.qtype),
        },
    })
}

/// The id and response code of an answer; `None` for anything shorter than
/// a header or without the QR bit (not an answer).
pub fn answer_header(bytes: &[u8]) -> Option<(u16, u8)> {
    if bytes.len() < HEADER || bytes[2] & 0x80 == 0 {
        return None;
    }
    Some((u16::from_be_bytes([bytes[0], bytes[1]]), bytes[3] & 0x0f))
}

/// The local answer to a denied query (one [`parse_query`] read): its
/// header and question section as they came, with QR and RA set, the
/// opcode and RD kept, AA, TC, AD and CD cleared, no records, and `rcode`
/// (REFUSED or NXDOMAIN). `None` when the question section does not parse.
pub fn deny_answer(query: &[u8], rcode: DenyAnswer) -> Option<Vec<u8>> {
    let (end, _) = questions(query)?;
    let mut answer = query[..end].to_vec();
    // QR, the opcode and RD from the query; the rest of byte 2 cleared.
    answer[2] = 0x80 | (query[2] & 0x79);
    // RA: the resolver answers (it refuses); Z, AD, CD cleared.
    answer[3] = 0x80
        | match rcode {
            DenyAnswer::Refused => RCODE::Refused as u8,
            DenyAnswer::Nxdomain => RCODE::NameError as u8,
        };
    // No answer, authority or additional records (the query's OPT stays out).
    answer[6..HEADER].fill(0);
    Some(answer)
}

/// What a denied query is answered with (`--dns-deny-answer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DenyAnswer {
    /// REFUSED: the resolver will not answer this (the client may try
    /// another server).
    #[default]
    Refused,
    /// NXDOMAIN: the name does not exist (the client stops there).
    Nxdomain,
}

/// The mnemonic of a response code (RFC 1035, 2136), `RCODE<n>` for others.
pub fn rcode_name(code: u8) -> String {
    let name = match code {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        other => return format!("RCODE{other}"),
    };
    name.to_string()
}

/// The mnemonic of a question type; `TYPE<n>` (RFC 3597) for types the
/// parser does not name.
fn qtype_name(qtype: QTYPE) -> String {
    match qtype {
        QTYPE::TYPE(TYPE::Unknown(n)) => format!("TYPE{n}"),
        QTYPE::TYPE(t) => format!("{t:?}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use simple_dns::{Name, Question, CLASS, QCLASS};

    /// A query for `name` of type `qtype` with recursion desired, as a stub
    /// resolver sends it.
    pub fn query(id: u16, name: &str, qtype: TYPE) -> Vec<u8> {
        let mut packet = Packet::new_query(id);
        packet.set_flags(PacketFlag::RECURSION_DESIRED);
        packet.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(qtype),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        packet.build_bytes_vec().unwrap()
    }

    #[test]
    fn queries_name_their_question() {
        let q = parse_query(&query(0x1234, "WWW.Example.Test", TYPE::AAAA)).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.names, ["www.example.test"]);
        assert_eq!(q.qtype, "AAAA");
        let q = parse_query(&query(1, "svc.example.test", TYPE::HTTPS)).unwrap();
        assert_eq!(q.qtype, "HTTPS");
        let q = parse_query(&query(1, "x.test", TYPE::Unknown(65280))).unwrap();
        assert_eq!(q.qtype, "TYPE65280");
    }

    #[test]
    fn malformed_and_truncated_queries_are_named() {
        let good = query(7, "www.example.test", TYPE::A);
        assert_eq!(parse_query(&good[..5]), Err(Malformed::Short(5)));
        assert_eq!(parse_query(&[]), Err(Malformed::Short(0)));
        // Cut inside the question: the header promises one, it is not there.
        for cut in [HEADER, HEADER + 4, good.len() - 1] {
            assert!(
                matches!(parse_query(&good[..cut]), Err(Malformed::Parse(_))),
                "cut at {cut}: {:?}",
                parse_query(&good[..cut])
            );
        }
        // A label pointer that points at itself.
        let mut looped = good[..HEADER].to_vec();
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(parse_query(&looped).is_err());
        // A header alone, no question.
        let mut empty = good[..HEADER].to_vec();
        empty[4..6].copy_from_slice(&[0, 0]);
        assert_eq!(parse_query(&empty), Err(Malformed::NoQuestion));
        // An answer sent as a query.
        let mut response = good.clone();
        response[2] |= 0x80;
        assert_eq!(parse_query(&response), Err(Malformed::Response));
        // 64 KiB of zeros: a header of zero counts is no question.
        assert_eq!(parse_query(&[0u8; 65507]), Err(Malformed::NoQuestion));
        // 64 KiB of 0xff: counts of 65535 that are not there.
        assert!(parse_query(&[0xffu8; 65507]).is_err());
    }

    #[test]
    fn denied_queries_get_a_local_answer() {
        let q = query(0xbeef, "ads.blocked.test", TYPE::A);
        for (deny, code) in [(DenyAnswer::Refused, 5), (DenyAnswer::Nxdomain, 3)] {
            let answer = deny_answer(&q, deny).unwrap();
            assert_eq!(answer_header(&answer), Some((0xbeef, code)));
            let parsed = Packet::parse(&answer).unwrap();
            assert!(parsed.has_flags(PacketFlag::RESPONSE));
            assert!(parsed.has_flags(PacketFlag::RECURSION_DESIRED));
            assert!(parsed.answers.is_empty());
            assert_eq!(parsed.questions.len(), 1);
            assert_eq!(parsed.questions[0].qname.to_string(), "ads.blocked.test");
        }
        assert_eq!(deny_answer(&q[..9], DenyAnswer::Refused), None);
        // The question comes back as asked: letter case and an unknown type.
        let odd = query(9, "AdS.bLoCkEd.TeSt", TYPE::Unknown(65280));
        let answer = deny_answer(&odd, DenyAnswer::Refused).unwrap();
        assert_eq!(answer[HEADER..], odd[HEADER..]);
        assert_eq!(parse_query(&odd).unwrap().qtype, "TYPE65280");
    }

    #[test]
    fn answers_are_read_by_their_header() {
        let q = query(42, "www.example.test", TYPE::A);
        assert_eq!(answer_header(&q), None, "a query is no answer");
        assert_eq!(answer_header(&[0x80; 5]), None);
        let mut answer = q.clone();
        answer[2] |= 0x80;
        answer[3] = (answer[3] & 0xf0) | 3;
        assert_eq!(answer_header(&answer), Some((42, 3)));
        assert_eq!(rcode_name(3), "NXDOMAIN");
        assert_eq!(rcode_name(0), "NOERROR");
        assert_eq!(rcode_name(5), "REFUSED");
        assert_eq!(rcode_name(12), "RCODE12");
    }
}
