//! Applying the rules: each change compiled and written under the idle
//! generation of the trie, then the generation flipped, so a connect sees
//! the old rule set or the new one, never a mix.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{Array, HashMap, LpmTrie, MapData};
use connredir_abi::{connredir_exe_name, connredir_rule_set, map_names};
use tracing::{debug, info, warn};

use super::compile::{compile, exe_name, CompiledRules, Rule, RuleId};
use super::trie;
use crate::{map_err, Engine, Error};

/// Whether every service the rule names is registered.
fn check_services(engine: &Engine, rule: &Rule) -> Result<(), Error> {
    for service in rule.services() {
        if !engine.services.contains_key(&service) {
            return Err(Error::InvalidRule(format!(
                "it names {service}, which is not registered"
            )));
        }
    }
    Ok(())
}

/// Adds a rule; it applies to the next connect.
pub(crate) fn add_rule(engine: &mut Engine, rule: Rule) -> Result<RuleId, Error> {
    rule.validate()?;
    check_services(engine, &rule)?;
    let id = RuleId(engine.next_rule);
    engine.rules.insert(id, rule);
    if let Err(e) = sync_rules(engine) {
        engine.rules.remove(&id);
        return Err(e);
    }
    engine.next_rule += 1;
    Ok(id)
}

/// Replaces every rule with `rules`, in one step: each connect sees
/// either the whole old rule set or the whole new one.
pub(crate) fn replace_rules(engine: &mut Engine, rules: Vec<Rule>) -> Result<Vec<RuleId>, Error> {
    for rule in &rules {
        rule.validate()?;
        check_services(engine, rule)?;
    }
    let ids: Vec<RuleId> = (0..rules.len() as u32)
        .map(|i| RuleId(engine.next_rule + i))
        .collect();
    let old = std::mem::replace(&mut engine.rules, ids.iter().copied().zip(rules).collect());
    if let Err(e) = sync_rules(engine) {
        engine.rules = old;
        return Err(e);
    }
    engine.next_rule += ids.len() as u32;
    Ok(ids)
}

/// Removes a rule.
pub(crate) fn remove_rule(engine: &mut Engine, id: RuleId) -> Result<Rule, Error> {
    let rule = engine.rules.remove(&id).ok_or(Error::UnknownRule(id.0))?;
    if let Err(e) = sync_rules(engine) {
        engine.rules.insert(id, rule);
        return Err(e);
    }
    // Its hit count goes with it (ids are not reused within an engine).
    if let Ok(mut hits) = aya::maps::PerCpuHashMap::<&mut MapData, u32, u64>::try_from(
        engine
            .bpf
            .map_mut(map_names::RULE_HITS)
            .expect("checked at load"),
    ) {
        let _ = hits.remove(&id.0);
    }
    Ok(rule)
}

/// The rules, by id.
pub(crate) fn rules(engine: &Engine) -> impl Iterator<Item = (RuleId, &Rule)> {
    engine.rules.iter().map(|(id, r)| (*id, r))
}

/// Compiles the rules and applies them all at once: the new set is
/// written under the inactive generation of the trie (only the prefixes
/// that differ from what that generation held), then `rules_active` is
/// flipped. A connect sees the old rule set or the new one, never a mix.
fn sync_rules(engine: &mut Engine) -> Result<(), Error> {
    let compiled = compile(engine.rules.iter().map(|(id, r)| (*id, r)))?;
    let target = 1 - engine.rules_generation;
    // A connect that read the flag just before the last flip may still be
    // reading `target`; connect programs run for microseconds.
    if let Some(flipped) = engine.rules_flipped_at {
        let grace = std::time::Duration::from_millis(20);
        if let Some(left) = grace.checked_sub(flipped.elapsed()) {
            std::thread::sleep(left);
        }
    }
    let previous = std::mem::take(&mut engine.installed[target as usize]);
    // The names first: a rule that names an executable must find its name
    // as soon as its generation is read.
    let written = write_exe_names(engine)
        .and_then(|()| write_generation(engine, target, &previous, &compiled))
        .and_then(|()| set_rules_generation(engine, target));
    if let Err(e) = written {
        // `target` is inactive and half written: empty it so that what it
        // holds is known again.
        let _ = write_generation(engine, target, &previous, &CompiledRules::new());
        return Err(e);
    }
    debug!(
        generation = target,
        prefixes = compiled.len(),
        rules = engine.rules.len(),
        "rules applied"
    );
    engine.installed[target as usize] = compiled;
    engine.rules_generation = target;
    engine.rules_flipped_at = Some(std::time::Instant::now());
    remove_stale_exe_names(engine);
    Ok(())
}

fn rule_exes(engine: &mut Engine) -> Result<HashMap<&mut MapData, u32, connredir_exe_name>, Error> {
    let name = map_names::RULE_EXES;
    HashMap::try_from(engine.bpf.map_mut(name).expect("checked at load")).map_err(map_err(name))
}

/// Writes the executable name of every rule that names one (again, for
/// the rules that had theirs: an id may have been written by a run whose
/// rules were then rolled back, and ids are not reused otherwise).
fn write_exe_names(engine: &mut Engine) -> Result<(), Error> {
    let names: Vec<(u32, connredir_exe_name)> = engine
        .rules
        .iter()
        .filter_map(|(id, rule)| Some((id.0, exe_name(rule)?)))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let mut map = rule_exes(engine)?;
    for (id, name) in &names {
        map.insert(id, name, 0)
            .map_err(map_err(map_names::RULE_EXES))?;
    }
    engine.rule_exes.extend(names.iter().map(|(id, _)| *id));
    Ok(())
}

/// Removes the names of rules that neither generation holds any more (the
/// inactive one may still be read by a connect that began before the flip).
/// A name left behind by a failure here is only memory: no rule names it.
fn remove_stale_exe_names(engine: &mut Engine) {
    let held: BTreeSet<u32> = engine
        .installed
        .iter()
        .flat_map(|generation| generation.values())
        .flat_map(|set| set.rules[..(set.count as usize).min(set.rules.len())].iter())
        .map(|rule| rule.rule_id)
        .collect();
    let stale: Vec<u32> = engine.rule_exes.difference(&held).copied().collect();
    if stale.is_empty() {
        return;
    }
    let Ok(mut map) = rule_exes(engine) else {
        return;
    };
    for id in &stale {
        if let Err(e) = map.remove(id) {
            warn!(rule = id, error = %e, "cannot remove a rule's executable name");
        }
    }
    engine.rule_exes.retain(|id| !stale.contains(id));
}

/// Turns generation `generation` of the trie from `from` into `to`.
pub(crate) fn write_generation(
    engine: &mut Engine,
    generation: u8,
    from: &CompiledRules,
    to: &CompiledRules,
) -> Result<(), Error> {
    let mut trie = engine.trie()?;
    let key = |net| trie::trie_key(generation, net);
    for (prefix, set) in to {
        if from.get(prefix) != Some(set) {
            trie.insert(&key(prefix), *set, 0)
                .map_err(map_err(map_names::RULES))?;
        }
    }
    for prefix in from.keys().filter(|p| !to.contains_key(*p)) {
        trie.remove(&key(prefix))
            .map_err(map_err(map_names::RULES))?;
    }
    Ok(())
}

pub(crate) fn set_rules_generation(engine: &mut Engine, generation: u8) -> Result<(), Error> {
    let name = map_names::RULES_ACTIVE;
    let mut active: Array<&mut MapData, u32> =
        Array::try_from(engine.bpf.map_mut(name).expect("checked at load"))
            .map_err(map_err(name))?;
    active
        .set(0, u32::from(generation), 0)
        .map_err(map_err(name))
}

/// Redirects per rule since the rule was added.
pub(crate) fn rule_hits(engine: &Engine) -> Result<BTreeMap<RuleId, u64>, Error> {
    let name = map_names::RULE_HITS;
    let map = engine.bpf.map(name).expect("checked at load");
    let hits =
        aya::maps::PerCpuHashMap::<&MapData, u32, u64>::try_from(map).map_err(map_err(name))?;
    let mut out: BTreeMap<RuleId, u64> = engine.rules.keys().map(|id| (*id, 0)).collect();
    for entry in hits.iter() {
        let (id, values) = entry.map_err(map_err(name))?;
        if let Some(count) = out.get_mut(&RuleId(id)) {
            *count = values.iter().sum();
        }
    }
    Ok(out)
}

/// Reads what pinned maps hold from an earlier run: the active rule
/// generation and both generations' contents, so the next change is
/// written as a difference and nothing is missing meanwhile.
pub(crate) fn adopt_rules(engine: &mut Engine) -> Result<(), Error> {
    let name = map_names::RULES_ACTIVE;
    let active: Array<&MapData, u32> =
        Array::try_from(engine.bpf.map(name).expect("checked at load")).map_err(map_err(name))?;
    engine.rules_generation = u8::from(active.get(&0, 0).map_err(map_err(name))? != 0);
    let name = map_names::RULES;
    let trie: LpmTrie<&MapData, trie::TrieData, connredir_rule_set> =
        LpmTrie::try_from(engine.bpf.map(name).expect("checked at load")).map_err(map_err(name))?;
    for entry in trie.iter() {
        let (key, set) = entry.map_err(map_err(name))?;
        // A key no engine writes cannot be adopted (nor matched by any connect
        // as a rule of ours): leave it, the next sync does not know it.
        let Some((generation, prefix)) = trie::decode_trie_key(&key) else {
            warn!(
                prefix_len = key.prefix_len(),
                "a rule trie key of no known form was left alone"
            );
            continue;
        };
        for rule in &set.rules[..(set.count as usize).min(set.rules.len())] {
            engine.next_rule = engine.next_rule.max(rule.rule_id + 1);
        }
        engine.installed[usize::from(generation)].insert(prefix, set);
    }
    let name = map_names::RULE_EXES;
    let names: HashMap<&MapData, u32, connredir_exe_name> =
        HashMap::try_from(engine.bpf.map(name).expect("checked at load")).map_err(map_err(name))?;
    for id in names.keys() {
        engine.rule_exes.insert(id.map_err(map_err(name))?);
    }
    if engine.installed.iter().any(|g| !g.is_empty()) {
        info!(
            generation = engine.rules_generation,
            prefixes = engine.installed[usize::from(engine.rules_generation)].len(),
            "took over the rules of the previous run"
        );
    }
    Ok(())
}
