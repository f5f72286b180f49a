//! The vCPU registry: each vCPU's ring mapped on add, drained on remove.

use super::*;

impl Vm {
    /// Creates vCPU `index` on this VM (`KVM_CREATE_VCPU`, id `index`) and
    /// registers it; returns its fd.
    pub fn create_vcpu(&self, index: u32) -> Result<kvm_ioctls::VcpuFd> {
        let mut life = self.life.lock();
        self.check_new_vcpu(index, None)?;
        let fd = self.kvm.create_vcpu(u64::from(index)).map_err(|e| {
            let err = Error::sys(
                &format!("KVM_CREATE_VCPU({index})"),
                e,
                "check the vCPU id against KVM_CAP_MAX_VCPU_ID and the VM's vCPU limit",
            );
            if e == libc::EEXIST {
                err.into_kind(ErrorKind::AlreadyExists)
            } else {
                err
            }
        })?;
        self.register_vcpu(
            &mut life,
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            index,
            Some(index),
        )?;
        Ok(fd)
    }

    /// Registers a vCPU fd; in ring modes maps its ring.
    pub fn add_vcpu(&self, vcpu_fd: i32, index: u32) -> Result<()> {
        if vcpu_fd < 0 {
            return Err(Error::inval(format!("bad vCPU fd {vcpu_fd}")));
        }
        let kernel_id = crate::kvm::vcpu_id_of(vcpu_fd)?;
        let mut life = self.life.lock();
        self.check_new_vcpu(index, kernel_id)?;
        self.register_vcpu(&mut life, vcpu_fd, index, kernel_id)
    }

    /// `EEXIST` for an index registered already, or for a kernel vCPU (by
    /// its id) registered under another index (lifecycle lock held).
    fn check_new_vcpu(&self, index: u32, kernel_id: Option<u32>) -> Result<()> {
        let vcpus = self.vcpus.read();
        if vcpus.contains_key(&index) {
            return Err(Error::new(
                libc::EEXIST,
                format!("vCPU index {index} is already registered"),
            ));
        }
        if let Some(id) = kernel_id
            && let Some((other, _)) = vcpus.iter().find(|(_, v)| v.kernel_id == Some(id))
        {
            return Err(Error::new(
                libc::EEXIST,
                format!(
                    "this fd is KVM vCPU {id}, registered already as index {other}: register \
                     each vCPU once"
                ),
            ));
        }
        Ok(())
    }

    /// Maps the ring of `vcpu_fd` (ring modes) and records the vCPU.
    fn register_vcpu(
        &self,
        life: &mut Lifecycle,
        vcpu_fd: i32,
        index: u32,
        kernel_id: Option<u32>,
    ) -> Result<()> {
        let entries = self.ring_entries();
        let ring = if self.mode().has_ring() {
            Some(Ring::map(vcpu_fd, entries, self.page_size)?)
        } else {
            None
        };
        let v = Arc::new(Vcpu {
            ring,
            kernel_id,
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
