//! A recording fake of the kernel seam: the same state the kernel would hold, in memory, plus a
//! log of every mutating call so tests can assert the plan an input produced (and that a
//! reconcile of an already-correct state changes nothing).

use std::collections::BTreeSet;
use std::sync::Mutex;

use super::{Addr, Fdb, Kernel, KernelError, LinkInfo, Neigh, Route, VxlanAttrs, VxlanSpec};

/// In-memory kernel state and a call log.
#[derive(Default)]
pub struct FakeKernel {
    state: Mutex<State>,
}

/// The fake's state, public so tests can arrange and inspect it.
#[derive(Default, Debug, Clone)]
pub struct State {
    /// Devices.
    pub links: Vec<LinkInfo>,
    /// Addresses.
    pub addrs: Vec<Addr>,
    /// Routes (both families).
    pub routes: BTreeSet<Route>,
    /// Neighbours.
    pub neighs: BTreeSet<Neigh>,
    /// FDB entries.
    pub fdb: BTreeSet<Fdb>,
    /// Sysctls written.
    pub sysctls: Vec<(String, String)>,
    /// Every mutating call, in order.
    pub calls: Vec<String>,
    next_index: u32,
}

impl FakeKernel {
    /// A kernel with one uplink `eth0` (index 2) carrying `addr`.
    pub fn with_uplink(addr: &str, mtu: u32) -> Self {
        let k = FakeKernel::default();
        {
            let mut s = k.state.lock().unwrap();
            s.next_index = 10;
            s.links.push(LinkInfo {
                index: 2,
                name: "eth0".into(),
                mac: Some([2, 0, 0, 0, 0, 2]),
                mtu,
                up: true,
                vxlan: None,
            });
            s.addrs.push(Addr {
                ifindex: 2,
                net: addr.parse().unwrap(),
            });
        }
        k
    }

    /// A copy of the state.
    pub fn state(&self) -> State {
        self.state.lock().unwrap().clone()
    }

    /// Mutates the state directly (an admin deleting a route, say), without logging a call.
    pub fn tamper(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap());
    }

    /// Takes the call log.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut self.state.lock().unwrap().calls)
    }

    fn log(&self, call: String) -> std::sync::MutexGuard<'_, State> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(call);
        s
    }

    /// Records `call` and puts `new` into the set `of` the state picks, in place of the entry
    /// with its `key`, as the kernel does on a REPLACE.
    #[expect(
        clippy::unnecessary_wraps,
        reason = "the result of the Kernel method it serves"
    )]
    fn replace<T: Ord + Clone + std::fmt::Debug, K: PartialEq>(
        &self,
        call: &str,
        of: impl FnOnce(&mut State) -> &mut BTreeSet<T>,
        new: &T,
        key: impl Fn(&T) -> K,
    ) -> Result<(), KernelError> {
        let mut s = self.log(format!("{call} {new:?}"));
        let set = of(&mut s);
        set.retain(|e| key(e) != key(new));
        set.insert(new.clone());
        Ok(())
    }

    /// Records `call` and removes `old` from the set `of` the state picks.
    #[expect(
        clippy::unnecessary_wraps,
        reason = "the result of the Kernel method it serves"
    )]
    fn delete<T: Ord + std::fmt::Debug>(
        &self,
        call: &str,
        of: impl FnOnce(&mut State) -> &mut BTreeSet<T>,
        old: &T,
    ) -> Result<(), KernelError> {
        let mut s = self.log(format!("{call} {old:?}"));
        of(&mut s).remove(old);
        Ok(())
    }
}

impl Kernel for FakeKernel {
    async fn links(&self) -> Result<Vec<LinkInfo>, KernelError> {
        Ok(self.state.lock().unwrap().links.clone())
    }
    async fn addresses(&self) -> Result<Vec<Addr>, KernelError> {
        Ok(self.state.lock().unwrap().addrs.clone())
    }
    async fn routes(&self, v6: bool) -> Result<Vec<Route>, KernelError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .routes
            .iter()
            .filter(|r| matches!(r.dst, ipnet::IpNet::V6(_)) == v6)
            .cloned()
            .collect())
    }
    async fn neighbours(&self, ifindex: u32) -> Result<Vec<Neigh>, KernelError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .neighs
            .iter()
            .filter(|n| n.ifindex == ifindex)
            .cloned()
            .collect())
    }
    async fn fdb(&self, ifindex: u32) -> Result<Vec<Fdb>, KernelError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .fdb
            .iter()
            .filter(|n| n.ifindex == ifindex)
            .cloned()
            .collect())
    }
    async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<(), KernelError> {
        let mut s = self.log(format!("create_vxlan {}", spec.name));
        s.next_index += 1;
        let index = s.next_index;
        let mac = [0x0e, 0, 0, 0, 0, u8::try_from(index % 256).unwrap()];
        s.links.push(LinkInfo {
            index,
            name: spec.name.clone(),
            mac: Some(mac),
            mtu: 1500,
            up: false,
            vxlan: Some(VxlanAttrs {
                vni: spec.vni,
                local: Some(spec.local),
                uplink: Some(spec.uplink),
                port: spec.port,
                learning: false,
            }),
        });
        Ok(())
    }
    async fn delete_link(&self, ifindex: u32) -> Result<(), KernelError> {
        let mut s = self.log(format!("delete_link {ifindex}"));
        s.links.retain(|l| l.index != ifindex);
        s.addrs.retain(|a| a.ifindex != ifindex);
        s.routes.retain(|r| r.oif != ifindex);
        s.neighs.retain(|n| n.ifindex != ifindex);
        s.fdb.retain(|n| n.ifindex != ifindex);
        Ok(())
    }
    async fn set_up(&self, ifindex: u32, mtu: u32) -> Result<(), KernelError> {
        let mut s = self.log(format!("set_up {ifindex} mtu {mtu}"));
        let link = s
            .links
            .iter_mut()
            .find(|l| l.index == ifindex)
            .ok_or_else(|| KernelError::NotFound(format!("link {ifindex}")))?;
        link.up = true;
        link.mtu = mtu;
        Ok(())
    }
    async fn add_address(&self, addr: Addr) -> Result<(), KernelError> {
        let mut s = self.log(format!("add_address {} {}", addr.ifindex, addr.net));
        if !s.addrs.contains(&addr) {
            s.addrs.push(addr);
        }
        Ok(())
    }
    async fn del_address(&self, addr: Addr) -> Result<(), KernelError> {
        let mut s = self.log(format!("del_address {} {}", addr.ifindex, addr.net));
        s.addrs.retain(|a| *a != addr);
        Ok(())
    }
    async fn replace_route(&self, route: &Route) -> Result<(), KernelError> {
        self.replace("replace_route", |s| &mut s.routes, route, |r| r.dst)
    }
    async fn del_route(&self, route: &Route) -> Result<(), KernelError> {
        self.delete("del_route", |s| &mut s.routes, route)
    }
    async fn replace_neigh(&self, neigh: &Neigh) -> Result<(), KernelError> {
        self.replace(
            "replace_neigh",
            |s| &mut s.neighs,
            neigh,
            |n| (n.ifindex, n.ip),
        )
    }
    async fn del_neigh(&self, neigh: &Neigh) -> Result<(), KernelError> {
        self.delete("del_neigh", |s| &mut s.neighs, neigh)
    }
    async fn replace_fdb(&self, fdb: &Fdb) -> Result<(), KernelError> {
        self.replace("replace_fdb", |s| &mut s.fdb, fdb, |f| (f.ifindex, f.mac))
    }
    async fn del_fdb(&self, fdb: &Fdb) -> Result<(), KernelError> {
        self.delete("del_fdb", |s| &mut s.fdb, fdb)
    }
    async fn set_sysctl(&self, key: &str, value: &str) -> Result<(), KernelError> {
        let mut s = self.state.lock().unwrap();
        s.sysctls.push((key.to_string(), value.to_string()));
        Ok(())
    }
}
