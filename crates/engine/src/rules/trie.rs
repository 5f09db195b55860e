//! The keys of the kernel's rule trie, as the engine uses them: a network
//! and the generation of the rules it belongs to. The byte layout
//! (`connredir_rule_key` in maps.h) is written and read by
//! [`connredir_abi::RulePrefix`], the one place that knows it.

use aya::maps::lpm_trie::Key;
use connredir_abi::{connredir_rule_key, RulePrefix, RULE_TRIE_DATA_LEN};
use ipnet::IpNet;

/// The bytes after `prefixlen` in the kernel's `connredir_rule_key`, as
/// aya's `LpmTrie` holds them.
pub(crate) type TrieData = [u8; RULE_TRIE_DATA_LEN];

/// The trie key of a network in one generation (0 or 1) of the rules.
pub(crate) fn trie_key(generation: u8, net: &IpNet) -> Key<TrieData> {
    let prefix = RulePrefix {
        generation,
        addr: net.network(),
        len: net.prefix_len(),
    };
    let (len, data) = prefix.encode().to_trie_parts();
    Key::new(len, data)
}

/// A trie key read back: its generation (0 or 1) and its network; `None`
/// for a key no engine writes (a family tag or length that does not fit).
pub(crate) fn decode_trie_key(key: &Key<TrieData>) -> Option<(u8, IpNet)> {
    let prefix = RulePrefix::decode(&connredir_rule_key::from_trie_parts(
        key.prefix_len(),
        &key.data(),
    ))
    .ok()?;
    let net = IpNet::new(prefix.addr, prefix.len).ok()?;
    Some((prefix.generation & 1, net))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_generation_and_the_family_tag() {
        let key = trie_key(1, &"192.168.0.0/16".parse().unwrap());
        assert_eq!(key.prefix_len(), 16 + 16);
        assert_eq!(&key.data()[..6], &[1, 4, 192, 168, 0, 0]);
    }

    #[test]
    fn a_key_reads_back_as_written() {
        for (generation, net) in [(0, "10.1.0.0/16"), (1, "2001:db8::/32"), (1, "::/0")] {
            let net: IpNet = net.parse().unwrap();
            let key = trie_key(generation, &net);
            assert_eq!(decode_trie_key(&key), Some((generation, net)), "{net}");
        }
    }
}
