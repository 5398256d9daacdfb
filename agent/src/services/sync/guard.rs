//! The guard against a store that lost everything ([`StoreGuard`]): a fresh or wiped etcd would
//! otherwise flush every node's services at the same moment. Pure: it judges a listing's facts
//! ([`StoreFacts`]) against the last ones acted on.

use crate::services::source::StoreFacts;

// The guard against a store that lost everything.

/// What the loop does with a listing ([`StoreGuard::judge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Act on it.
    Act,
    /// Act on it: the store that was suspect is confirmed (its config key was written again,
    /// or it holds objects).
    Confirmed,
    /// Keep the dataplane as it is and wait: the listing lost everything and the store looks
    /// new or wiped. `first`: the store just became suspect (warn and count once).
    Hold {
        /// Why, for the log.
        reasons: Vec<String>,
        /// The store just became suspect.
        first: bool,
    },
}

/// Judges listings that lost everything, so a fresh or wiped etcd does not flush every node's
/// services at once.
///
/// A listing is suspect when it is empty while the node holds services (in its state or its
/// dataplane) and the store looks new or wiped: the network config key is absent, etcd's cluster
/// id changed, or the revision went backwards. A suspect listing (and every change after it) is
/// held; the dataplane keeps what it has. The store is confirmed, and the next listing acted
/// on, once its config key exists and was written after the suspect listing was read (an
/// operator's deliberate step), or once it holds objects again. An empty listing with the
/// config key present, the same cluster and a revision that only moved forward is an ordinary
/// deletion of everything: acted on at once. Listings without facts (the Kubernetes source)
/// are always acted on.
#[derive(Debug, Clone, Default)]
pub struct StoreGuard {
    /// The facts of the last listing acted on.
    last: Option<StoreFacts>,
    /// The listing held back while the store is suspect.
    suspect: Option<StoreFacts>,
}

impl StoreGuard {
    /// While suspect: the facts of the listing that made it so.
    pub fn suspect(&self) -> Option<StoreFacts> {
        self.suspect
    }

    /// Objects arrived in the suspect store (watched after its empty listing): confirms it if
    /// its network config key exists (a store in use again); else it stays suspect.
    pub fn objects_arrived(&mut self) -> bool {
        match self.suspect {
            Some(s) if s.config.is_some() => {
                self.suspect = None;
                self.last = Some(s);
                true
            }
            _ => false,
        }
    }

    /// What to do with a listing with `facts`; `empty`: it holds no object (valid or not);
    /// `have_state`: the node holds services (known objects or programmed frontends).
    pub fn judge(&mut self, facts: Option<StoreFacts>, empty: bool, have_state: bool) -> Verdict {
        let Some(f) = facts else {
            return Verdict::Act;
        };
        if let Some(s) = self.suspect {
            let rewritten = f.cluster_id == s.cluster_id
                && f.revision >= s.revision
                && f.config.is_some_and(|c| c > s.revision);
            if rewritten || (!empty && f.config.is_some()) {
                self.suspect = None;
                self.last = Some(f);
                return Verdict::Confirmed;
            }
            if f.cluster_id != s.cluster_id || f.revision < s.revision {
                self.suspect = Some(f); // another new store: its config must be written anew
            }
            return Verdict::Hold {
                reasons: Self::reasons(self.last, f),
                first: false,
            };
        }
        if !empty || !have_state {
            self.last = Some(f);
            return Verdict::Act;
        }
        let reasons = Self::reasons(self.last, f);
        if reasons.is_empty() {
            self.last = Some(f);
            return Verdict::Act;
        }
        self.suspect = Some(f);
        Verdict::Hold {
            reasons,
            first: true,
        }
    }

    fn reasons(last: Option<StoreFacts>, f: StoreFacts) -> Vec<String> {
        let mut out = Vec::new();
        if f.config.is_none() {
            out.push("the network config key is absent".to_string());
        }
        if let Some(l) = last {
            if l.cluster_id != f.cluster_id {
                out.push(format!(
                    "the etcd cluster id changed from {:x} to {:x}",
                    l.cluster_id, f.cluster_id
                ));
            } else if f.revision < l.revision {
                out.push(format!(
                    "the store's revision went backwards from {} to {}",
                    l.revision, f.revision
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(cluster_id: u64, revision: i64, config: Option<i64>) -> StoreFacts {
        StoreFacts {
            cluster_id,
            revision,
            config,
        }
    }

    fn hold(first: bool, reason: &str) -> Verdict {
        Verdict::Hold {
            reasons: vec![reason.to_string()],
            first,
        }
    }

    /// Every way a listing can lose everything, and what confirms the store again.
    #[test]
    fn store_guard_holds_listings_that_lost_everything() {
        let absent = "the network config key is absent";
        let mut g = StoreGuard::default();
        assert_eq!(
            g.judge(Some(facts(1, 10, Some(2))), false, false),
            Verdict::Act
        );
        // Everything deleted with the config key present: an ordinary deletion.
        assert_eq!(
            g.judge(Some(facts(1, 12, Some(2))), true, true),
            Verdict::Act
        );
        // Nothing held on this node: nothing to lose.
        assert_eq!(g.judge(Some(facts(1, 13, None)), true, false), Verdict::Act);
        // The config key gone while the node holds services: held, reported once.
        assert_eq!(
            g.judge(Some(facts(1, 20, None)), true, true),
            hold(true, absent)
        );
        assert_eq!(
            g.judge(Some(facts(1, 21, None)), true, true),
            hold(false, absent)
        );
        // Objects without a config key: still held.
        assert_eq!(
            g.judge(Some(facts(1, 22, None)), false, true),
            hold(false, absent)
        );
        // The config key written again: the (empty) listing is a real deletion.
        assert_eq!(
            g.judge(Some(facts(1, 23, Some(23))), true, true),
            Verdict::Confirmed
        );
        assert_eq!(g.suspect(), None);
        // Another cluster: held even though its config key exists, until it is written anew.
        let moved = "the etcd cluster id changed from 1 to 7";
        assert_eq!(
            g.judge(Some(facts(7, 3, Some(1))), true, true),
            hold(true, moved)
        );
        assert_eq!(
            g.judge(Some(facts(7, 4, Some(1))), true, true),
            hold(false, moved)
        );
        assert_eq!(
            g.judge(Some(facts(7, 5, Some(5))), true, true),
            Verdict::Confirmed
        );
        // The revision went backwards in one cluster (a restored snapshot) and nothing is left:
        // held; services applied to it confirm it.
        assert_eq!(
            g.judge(Some(facts(7, 2, Some(1))), true, true),
            hold(true, "the store's revision went backwards from 5 to 2")
        );
        assert_eq!(
            g.judge(Some(facts(7, 3, Some(1))), false, true),
            Verdict::Confirmed
        );
        // Objects watched into a suspect store confirm it only if its config key exists.
        assert!(matches!(
            g.judge(Some(facts(8, 1, Some(1))), true, true),
            Verdict::Hold { first: true, .. }
        ));
        assert!(g.objects_arrived());
        assert!(matches!(
            g.judge(Some(facts(9, 1, None)), true, true),
            Verdict::Hold { first: true, .. }
        ));
        assert!(!g.objects_arrived());
        // A source without facts (Kubernetes) is always acted on.
        assert_eq!(StoreGuard::default().judge(None, true, true), Verdict::Act);
    }
}
