//! The vCPU registry: each vCPU's ring mapped on add, drained on remove.

use super::*;

impl Vm {
    /// Registers a vCPU fd; in ring modes maps its ring.
    pub fn add_vcpu(&self, vcpu_fd: i32, index: u32) -> Result<()> {
        if vcpu_fd < 0 {
            return Err(Error::inval(format!("bad vCPU fd {vcpu_fd}")));
        }
        let mut life = self.life.lock();
        if self.vcpus.read().contains_key(&index) {
            return Err(Error::new(
                libc::EEXIST,
                format!("vCPU index {index} is already registered"),
            ));
        }
        let entries = self.ring_entries();
        let ring = if self.mode().has_ring() {
            Some(Ring::map(vcpu_fd, entries, self.page_size)?)
        } else {
            None
        };
        let v = Arc::new(Vcpu {
            ring,
            ring_full_reaps: AtomicU64::new(0),
        });
        self.vcpus.write().insert(index, v);
        life.record_vcpu();
        log::debug!("vCPU {index} added (fd {vcpu_fd})");
        Ok(())
    }

    /// Unregisters a vCPU: harvests what is left in its ring, unmaps it.
    pub fn remove_vcpu(&self, index: u32) -> Result<()> {
        let _life = self.life.lock();
        let mut st = self.reap.lock();
        let Some(v) = self.vcpus.write().remove(&index) else {
            return Err(unknown_vcpu(index));
        };
        if let Some(r) = &v.ring {
            let h = self.harvest_one(&mut st, &self.slots.read(), r, false);
            self.reset(&mut st, &self.vcpus.read(), Some(r))?;
            self.reap_locked(&mut st, h.entries)?;
        }
        log::debug!("vCPU {index} removed");
        Ok(())
    }

    pub(super) fn vcpu(&self, index: u32) -> Result<Arc<Vcpu>> {
        self.vcpus
            .read()
            .get(&index)
            .cloned()
            .ok_or_else(|| unknown_vcpu(index))
    }
}

fn unknown_vcpu(index: u32) -> Error {
    Error::new(
        libc::ENOENT,
        format!("unknown vCPU index {index}: register it with add_vcpu first"),
    )
}
