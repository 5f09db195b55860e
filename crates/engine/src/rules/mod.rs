//! Rules: what they are and their compilation (`compile`), the keys of the
//! kernel's rule trie (`trie`), and how a rule set is applied in one step
//! (`sync`).

mod compile;
pub(crate) mod sync;
mod trie;

pub(crate) use compile::CompiledRules;
pub use compile::{
    check_rules, Action, CgroupCondition, CommandCondition, ExecutableCondition, Protocol, Rule,
    RuleId,
};
pub(crate) use trie::TrieData;
