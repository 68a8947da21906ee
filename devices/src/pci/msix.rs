//! MSI-X (PCI Local Bus 3.0, 6.8.2): the vector table and pending-bit array a function exposes
//! in one of its BARs, and the delivery of its vectors.
//!
//! Each vector has an eventfd the VMM registered as a KVM irqfd on a GSI of its own; when the
//! guest programs a table entry the message (address, data) is routed to that GSI through the
//! [`MsiRouter`]. A vector fired while masked (by its entry or the whole function) sets its
//! pending bit and is delivered when unmasked, as the specification requires.
//!
//! The table is guest-controlled: entries with an address outside the local APIC's MSI window
//! are never routed nor delivered, any access width is accepted, and nothing here can fail the
//! VMM.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::MsiRouter;

pub const MSIX_CAPABILITY_ID: u8 = 0x11;
pub const MSIX_ENTRY_SIZE: u64 = 16;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;
/// x86 MSI messages go to 0xfeexxxxx (Intel SDM 11.11.1).
const MSI_ADDRESS_WINDOW: u64 = 0xfee;

/// The MSI-X capability's body: ID, next pointer (filled by the configuration space), message
/// control (table size - 1), table and PBA offset with their BAR indicator.
pub fn capability(
    vectors: u16,
    bar: u8,
    table_offset: u32,
    pba_offset: u32,
) -> ([u8; 12], [u8; 12]) {
    let mut body = [0u8; 12];
    body[0] = MSIX_CAPABILITY_ID;
    body[2..4].copy_from_slice(&(vectors.saturating_sub(1) & 0x7ff).to_le_bytes());
    body[4..8].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
    body[8..12].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
    // Only Enable and Function Mask (the top two bits of message control) are writable.
    let mut writable = [0u8; 12];
    writable[3] = 0xc0;
    (body, writable)
}

/// Reads the enable and function-mask bits from a message control value.
pub fn control_bits(control: u16) -> (bool, bool) {
    (
        control & CONTROL_ENABLE != 0,
        control & CONTROL_FUNCTION_MASK != 0,
    )
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MsixEntry {
    pub address_lo: u32,
    pub address_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl MsixEntry {
    fn masked(&self) -> bool {
        self.control & ENTRY_MASKED != 0
    }

    fn address(&self) -> u64 {
        u64::from(self.address_hi) << 32 | u64::from(self.address_lo)
    }

    fn deliverable(&self) -> bool {
        self.address() >> 20 == MSI_ADDRESS_WINDOW
    }

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        for (i, v) in [self.address_lo, self.address_hi, self.data, self.control]
            .into_iter()
            .enumerate()
        {
            b[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn from_bytes(b: &[u8; 16]) -> Self {
        let word =
            |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        Self {
            address_lo: word(0),
            address_hi: word(1),
            data: word(2),
            // Bits other than Mask are reserved (read as 0).
            control: word(3) & ENTRY_MASKED,
        }
    }
}

/// The saved vector table and pending bits (enable and function mask live in configuration
/// space and are saved with it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MsixState {
    pub entries: Vec<MsixEntry>,
    pub pending: Vec<bool>,
}

/// One vector's host side: the irqfd's eventfd and the GSI it is registered on.
pub struct MsixVector {
    pub gsi: u32,
    pub irq: EventFd,
}

pub struct Msix {
    entries: Vec<MsixEntry>,
    pending: Vec<bool>,
    vectors: Vec<MsixVector>,
    enabled: bool,
    function_masked: bool,
    router: Arc<dyn MsiRouter>,
    warned: bool,
}

impl Msix {
    /// A table with one entry per vector, all masked (the reset state).
    pub fn new(vectors: Vec<MsixVector>, router: Arc<dyn MsiRouter>) -> Self {
        let n = vectors.len();
        Self {
            entries: vec![
                MsixEntry {
                    control: ENTRY_MASKED,
                    ..Default::default()
                };
                n
            ],
            pending: vec![false; n],
            vectors,
            enabled: false,
            function_masked: false,
            router,
            warned: false,
        }
    }

    pub fn vector_count(&self) -> usize {
        self.vectors.len()
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The irqfd behind `vector` (what a vhost-user backend signals directly).
    pub fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(vector)).map(|v| &v.irq)
    }

    pub fn table_size_bytes(&self) -> u64 {
        self.vectors.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// The guest wrote message control: takes the new enable and function-mask bits and
    /// delivers what became unmasked.
    pub fn set_control(&mut self, enabled: bool, function_masked: bool) {
        self.enabled = enabled;
        self.function_masked = function_masked;
        self.deliver_pending();
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let entry = (at / MSIX_ENTRY_SIZE) as usize;
            *b = self
                .entries
                .get(entry)
                .map_or(0, |e| e.to_bytes()[(at % MSIX_ENTRY_SIZE) as usize]);
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let mut touched = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            let at = offset + i as u64;
            let index = (at / MSIX_ENTRY_SIZE) as usize;
            let Some(entry) = self.entries.get_mut(index) else {
                continue;
            };
            let mut bytes = entry.to_bytes();
            bytes[(at % MSIX_ENTRY_SIZE) as usize] = b;
            *entry = MsixEntry::from_bytes(&bytes);
            if touched.last() != Some(&index) {
                touched.push(index);
            }
        }
        // Drivers program an entry while it is masked and then unmask it: routing only unmasked
        // entries makes that one KVM routing update per vector instead of one per dword.
        for index in touched {
            if self.entries.get(index).is_some_and(|e| !e.masked()) {
                self.route(index);
            }
        }
        self.deliver_pending();
    }

    /// Pending bits, 64 per qword; writes to the PBA are ignored (it is read-only).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let bit0 = (offset + i as u64) * 8;
            *b = (0..8u64).fold(0u8, |acc, bit| {
                let set = self
                    .pending
                    .get((bit0 + bit) as usize)
                    .copied()
                    .unwrap_or(false);
                acc | (u8::from(set) << bit)
            });
        }
    }

    /// Fires `vector`: delivered now, or remembered as pending while masked. Vectors past the
    /// table are ignored.
    pub fn trigger(&mut self, vector: u16) -> std::io::Result<()> {
        let index = usize::from(vector);
        let Some(entry) = self.entries.get(index) else {
            return Ok(());
        };
        if self.function_masked || entry.masked() {
            self.pending[index] = true;
            return Ok(());
        }
        self.deliver(index)
    }

    fn deliver(&mut self, index: usize) -> std::io::Result<()> {
        let (Some(entry), Some(vector)) = (self.entries.get(index), self.vectors.get(index)) else {
            return Ok(());
        };
        if !entry.deliverable() {
            if !self.warned {
                self.warned = true;
                log::warn!(
                    "MSI-X vector {index} has address {:#x}, outside the MSI window: not delivered (further such warnings suppressed)",
                    entry.address()
                );
            }
            return Ok(());
        }
        vector.irq.write(1)
    }

    fn deliver_pending(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for index in 0..self.entries.len() {
            if self.pending[index] && !self.entries[index].masked() {
                self.pending[index] = false;
                if let Err(e) = self.deliver(index) {
                    log::warn!("cannot deliver pending MSI-X vector {index}: {e}");
                }
            }
        }
    }

    /// Points the vector's GSI at the entry's message.
    fn route(&mut self, index: usize) {
        let (Some(entry), Some(vector)) = (self.entries.get(index), self.vectors.get(index)) else {
            return;
        };
        if !entry.deliverable() {
            return;
        }
        if let Err(e) = self.router.route(vector.gsi, entry.address(), entry.data) {
            log::warn!(
                "cannot route MSI-X vector {index} (GSI {}): {e}",
                vector.gsi
            );
        }
    }

    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pending: self.pending.clone(),
        }
    }

    /// Takes back the table and pending bits and routes every programmed vector again (the
    /// destination's GSI routing starts empty).
    pub fn restore(
        &mut self,
        state: &MsixState,
        enabled: bool,
        function_masked: bool,
    ) -> Result<(), String> {
        if state.entries.len() != self.entries.len() || state.pending.len() != self.entries.len() {
            return Err(format!(
                "MSI-X table has {} vectors but the snapshot has {}",
                self.entries.len(),
                state.entries.len()
            ));
        }
        self.entries = state
            .entries
            .iter()
            .map(|e| MsixEntry::from_bytes(&e.to_bytes()))
            .collect();
        self.pending = state.pending.clone();
        self.enabled = enabled;
        self.function_masked = function_masked;
        for index in 0..self.entries.len() {
            if !self.entries[index].masked() {
                self.route(index);
            }
        }
        Ok(())
    }

    /// Fires every unmasked, programmed vector once: after a restore the guest may have been
    /// about to take one of them; a spurious interrupt is harmless, a lost one can hang a
    /// driver.
    pub fn kick_all(&mut self) {
        if !self.enabled {
            return;
        }
        for index in 0..self.entries.len() {
            if let Err(e) = self.trigger(index as u16) {
                log::warn!("cannot re-raise MSI-X vector {index}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    #[derive(Default)]
    struct Routes(Mutex<Vec<(u32, u64, u32)>>);

    impl MsiRouter for Routes {
        fn route(&self, gsi: u32, address: u64, data: u32) -> std::io::Result<()> {
            self.0.lock().unwrap().push((gsi, address, data));
            Ok(())
        }
    }

    fn msix(n: u32) -> (Msix, Arc<Routes>) {
        let routes = Arc::new(Routes::default());
        let vectors = (0..n)
            .map(|i| MsixVector {
                gsi: 24 + i,
                irq: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect();
        (Msix::new(vectors, routes.clone()), routes)
    }

    fn program(m: &mut Msix, index: u64, address: u64, data: u32, masked: bool) {
        let e = MsixEntry {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            control: u32::from(masked),
        };
        m.write_table(index * MSIX_ENTRY_SIZE, &e.to_bytes());
    }

    fn fired(m: &Msix, index: usize) -> bool {
        m.vectors[index].irq.read().is_ok()
    }

    #[test]
    fn masked_vector_pends_until_unmasked() {
        let (mut m, routes) = msix(2);
        m.set_control(true, false);
        program(&mut m, 1, 0xfee0_0000, 0x41, true);
        assert!(
            routes.0.lock().unwrap().is_empty(),
            "a masked entry is not routed yet"
        );
        m.trigger(1).unwrap();
        assert!(!fired(&m, 1));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        // Unmask through a 4-byte write of the control word only.
        m.write_table(MSIX_ENTRY_SIZE + 12, &0u32.to_le_bytes());
        assert_eq!(
            routes.0.lock().unwrap().as_slice(),
            &[(25, 0xfee0_0000, 0x41)]
        );
        assert!(fired(&m, 1));
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let (mut m, _) = msix(1);
        program(&mut m, 0, 0xfee0_0000, 0x30, false);
        m.set_control(true, true);
        m.trigger(0).unwrap();
        assert!(!fired(&m, 0));
        m.set_control(true, false);
        assert!(fired(&m, 0));
    }

    #[test]
    fn bad_addresses_and_vectors_are_ignored() {
        let (mut m, routes) = msix(1);
        m.set_control(true, false);
        program(&mut m, 0, 0x1234_0000, 0x30, false);
        assert!(routes.0.lock().unwrap().is_empty());
        m.trigger(0).unwrap();
        assert!(!fired(&m, 0));
        m.trigger(7).unwrap();
        m.write_table(0x1000, &[1, 2, 3]);
        let mut b = [0xffu8; 4];
        m.read_table(0x1000, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn state_round_trips_and_reroutes() {
        let (mut m, _) = msix(3);
        m.set_control(true, false);
        program(&mut m, 2, 0xfee0_1000, 0x55, true);
        program(&mut m, 0, 0xfee0_2000, 0x66, false);
        m.trigger(2).unwrap();
        let s = m.state();
        let (mut n, routes) = msix(3);
        n.restore(&s, true, false).unwrap();
        assert_eq!(n.state(), s);
        // The unmasked vector is routed again; the masked one will be when it is unmasked.
        assert_eq!(
            routes.0.lock().unwrap().as_slice(),
            &[(24, 0xfee0_2000, 0x66)]
        );
        let (mut small, _) = msix(2);
        assert!(small.restore(&s, true, false).is_err());
    }

    /// Property: any sequence of table writes at any offset and width leaves a table whose
    /// reads agree with a byte model of it (control words keep only the mask bit).
    #[test]
    fn table_matches_a_byte_model_under_random_writes() {
        let (mut m, _) = msix(4);
        let mut model = vec![0u8; 64];
        for e in 0..4 {
            model[e * 16 + 12] = 1;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = [1usize, 2, 4, 8][(next() % 4) as usize];
            let offset = next() % 72;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            m.write_table(offset, &data);
            for (i, &b) in data.iter().enumerate() {
                let at = offset as usize + i;
                if at < 64 {
                    model[at] = if at % 16 >= 12 {
                        if at % 16 == 12 {
                            b & 1
                        } else {
                            0
                        }
                    } else {
                        b
                    };
                }
            }
            let mut all = vec![0u8; 64];
            m.read_table(0, &mut all);
            assert_eq!(all, model);
            if next() % 3 == 0 {
                m.set_control(next() % 2 == 0, next() % 2 == 0);
                m.trigger((next() % 6) as u16).unwrap();
            }
        }
    }
}
