//! Typed access to the object's maps.

use aya::maps::{Array, HashMap, LpmTrie, MapData};
use aya::Pod;
use connredir_abi::{connredir_rule_set, connredir_service, map_names};

use crate::rules::TrieData;
use crate::{map_err, Engine, Error};

impl Engine {
    /// A hash map of the object, by name.
    pub(crate) fn hash<K: Pod, V: Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, Error> {
        let map = self.bpf.map_mut(name).expect("checked at load");
        HashMap::try_from(map).map_err(map_err(name))
    }

    /// The `services` array.
    pub(crate) fn services_map(&mut self) -> Result<Array<&mut MapData, connredir_service>, Error> {
        let name = map_names::SERVICES;
        Array::try_from(self.bpf.map_mut(name).expect("checked at load")).map_err(map_err(name))
    }

    /// The rule trie.
    pub(crate) fn trie(
        &mut self,
    ) -> Result<LpmTrie<&mut MapData, TrieData, connredir_rule_set>, Error> {
        let name = map_names::RULES;
        LpmTrie::try_from(self.bpf.map_mut(name).expect("checked at load")).map_err(map_err(name))
    }
}
