//! The keys of the kernel's rule trie (`connredir_rule_key` in abi.h),
//! written and read back here only.
//!
//! A compiled prefix is the prefix length counting an 8-bit family tag,
//! with the tag (4 or 6) followed by the address. In the trie it is
//! preceded by one byte of generation, which the prefix length counts too.

use ipnet::IpNet;

/// A compiled prefix: the prefix length including the 8-bit family tag, and
/// the tag (4 or 6) followed by the address.
pub(crate) type PrefixKey = (u32, [u8; 17]);

/// The bytes after `prefixlen` in the kernel's `connredir_rule_key`
/// (generation, family tag, address, padding).
pub(crate) type TrieData = [u8; 20];

/// The compiled prefix of a network.
pub(crate) fn prefix_key(net: &IpNet) -> PrefixKey {
    let mut data = [0u8; 17];
    match net {
        IpNet::V4(n) => {
            data[0] = 4;
            data[1..5].copy_from_slice(&n.network().octets());
        }
        IpNet::V6(n) => {
            data[0] = 6;
            data[1..17].copy_from_slice(&n.network().octets());
        }
    }
    (8 + u32::from(net.prefix_len()), data)
}

/// The trie key of a prefix in one generation of the rules (see abi.h).
pub(crate) fn trie_key(generation: u8, (len, tagged): &PrefixKey) -> (u32, TrieData) {
    let mut data = [0u8; 20];
    data[0] = generation;
    data[1..18].copy_from_slice(tagged);
    (8 + len, data)
}

/// A trie key read back (prefix length and data): its generation (0 or 1)
/// and its prefix, as [`trie_key`] made them.
pub(crate) fn decode_trie_key(len: u32, data: &TrieData) -> (u8, PrefixKey) {
    let mut tagged = [0u8; 17];
    tagged.copy_from_slice(&data[1..18]);
    (data[0] & 1, (len - 8, tagged))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_generation_and_the_family_tag() {
        let prefix = prefix_key(&"192.168.0.0/16".parse().unwrap());
        assert_eq!(prefix.0, 8 + 16);
        assert_eq!(&prefix.1[..5], &[4, 192, 168, 0, 0]);
        let (len, data) = trie_key(1, &prefix);
        assert_eq!(len, 16 + 16);
        assert_eq!(&data[..6], &[1, 4, 192, 168, 0, 0]);
    }

    #[test]
    fn a_key_reads_back_as_written() {
        for (generation, net) in [(0, "10.1.0.0/16"), (1, "2001:db8::/32"), (1, "::/0")] {
            let prefix = prefix_key(&net.parse().unwrap());
            let (len, data) = trie_key(generation, &prefix);
            assert_eq!(decode_trie_key(len, &data), (generation, prefix), "{net}");
        }
    }
}
