//! TX metadata (`Documentation/networking/xsk-tx-metadata.rst`): asking the
//! NIC for a transmit timestamp per packet.
//!
//! With a UMEM registered with `tx_metadata_len` > 0, the `tx_metadata_len`
//! bytes just before a TX descriptor's `addr` hold a `struct xsk_tx_metadata`
//! (at their start; the rest is padding). When the descriptor carries the
//! `XDP_TX_METADATA` option and the struct's flags ask for
//! `XDP_TXMD_FLAGS_TIMESTAMP`, the driver writes the transmit time into
//! `completion.tx_timestamp` (same area, same frame) before the frame's
//! address appears on the completion ring.
//!
//! That area overlaps the XDP program's receive metadata (which sits right
//! before the packet too): read the receive metadata before asking for a TX
//! timestamp on a reply built in place.

use super::sys::{
    XDP_TX_METADATA, XDP_TXMD_FLAGS_TIMESTAMP, XSK_TX_METADATA_SIZE, XSK_TX_METADATA_TIMESTAMP_OFFSET, XskTxMetadata,
};
use super::umem::Umem;

/// Helpers over the metadata area of a frame. Offsets are packet offsets in
/// the frame ("chunk") that holds them.
#[derive(Debug)]
#[non_exhaustive]
pub struct TxMetadata;

impl TxMetadata {
    /// Bytes of `struct xsk_tx_metadata` the helpers use: `flags` and the
    /// completion word (16), so a `tx_metadata_len` of 16 suffices.
    pub const USED: usize = 16;

    /// Writes a timestamp request in front of the packet at `pkt_offset` of
    /// `chunk` and returns the descriptor option to set (`XDP_TX_METADATA`),
    /// or `None` (nothing written) when TX metadata is off
    /// (`tx_metadata_len` < 16) or the headroom is too short.
    pub fn request_timestamp(chunk: &mut [u8], pkt_offset: usize, tx_metadata_len: u32) -> Option<u32> {
        let area = Self::area_mut(chunk, pkt_offset, tx_metadata_len)?;
        area[..8].copy_from_slice(&u64::from(XDP_TXMD_FLAGS_TIMESTAMP).to_ne_bytes());
        // Clear the union so a stale value never reads as a timestamp (and no
        // checksum/launch-time request is left over).
        let clear = Self::USED.max(area.len().min(XSK_TX_METADATA_SIZE as usize));
        area[8..clear].fill(0);
        Some(XDP_TX_METADATA)
    }

    /// After completion: the transmit timestamp the driver wrote for the
    /// packet that was at `pkt_offset` (the completion ring's address), if it
    /// was asked for and given (nonzero). The clock is the driver's: the NIC's
    /// PHC for hardware stamps; in copy mode, kernels that fill it use
    /// `CLOCK_TAI` at skb destruction.
    pub fn completion_timestamp(chunk: &[u8], pkt_offset: usize, tx_metadata_len: u32) -> Option<u64> {
        let start = pkt_offset.checked_sub(tx_metadata_len as usize)?;
        if (tx_metadata_len as usize) < Self::USED {
            return None;
        }
        let area = chunk.get(start..pkt_offset)?;
        let flags = u64::from_ne_bytes(area[..8].try_into().ok()?);
        let off = XSK_TX_METADATA_TIMESTAMP_OFFSET;
        let ts = u64::from_ne_bytes(area[off..off + 8].try_into().ok()?);
        (flags & u64::from(XDP_TXMD_FLAGS_TIMESTAMP) != 0 && ts != 0).then_some(ts)
    }

    /// [`request_timestamp`](Self::request_timestamp) for the packet at UMEM
    /// address `addr`.
    pub fn request_timestamp_at(umem: &mut Umem, addr: u64) -> Option<u32> {
        let len = umem.tx_metadata_len();
        let (chunk, off) = umem.chunk_mut(addr);
        Self::request_timestamp(chunk, off, len)
    }

    /// [`completion_timestamp`](Self::completion_timestamp) for the packet
    /// at UMEM address `addr` (as returned on the completion ring).
    pub fn completion_timestamp_at(umem: &Umem, addr: u64) -> Option<u64> {
        let base = umem.frame_base(addr);
        Self::completion_timestamp(umem.frame(base), (addr - base) as usize, umem.tx_metadata_len())
    }

    /// Decodes the area in front of `pkt_offset` (for tests and debugging).
    pub fn read(chunk: &[u8], pkt_offset: usize, tx_metadata_len: u32) -> Option<XskTxMetadata> {
        let start = pkt_offset.checked_sub(tx_metadata_len as usize)?;
        let area = chunk.get(start..pkt_offset)?;
        let word = |i: usize| area.get(i * 8..i * 8 + 8).map(|b| u64::from_ne_bytes(b.try_into().unwrap()));
        Some(XskTxMetadata { flags: word(0)?, word0: word(1).unwrap_or(0), word1: word(2).unwrap_or(0) })
    }

    fn area_mut(chunk: &mut [u8], pkt_offset: usize, tx_metadata_len: u32) -> Option<&mut [u8]> {
        if (tx_metadata_len as usize) < Self::USED {
            return None;
        }
        let start = pkt_offset.checked_sub(tx_metadata_len as usize)?;
        chunk.get_mut(start..pkt_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let mut chunk = [0xeeu8; 512];
        let opt = TxMetadata::request_timestamp(&mut chunk, 256, 24).unwrap();
        assert_eq!(opt, XDP_TX_METADATA);
        assert_eq!(opt, 1 << 1);
        // struct xsk_tx_metadata at addr - tx_metadata_len: flags (u64) = TIMESTAMP.
        assert_eq!(&chunk[232..240], &1u64.to_ne_bytes());
        assert_eq!(&chunk[240..256], &[0u8; 16], "union cleared");
        assert_eq!(chunk[231], 0xee, "nothing written before the area");
        assert_eq!(chunk[256], 0xee, "packet untouched");
        assert_eq!(
            TxMetadata::read(&chunk, 256, 24),
            Some(XskTxMetadata { flags: XDP_TXMD_FLAGS_TIMESTAMP.into(), word0: 0, word1: 0 })
        );
        // Not yet completed: no timestamp.
        assert_eq!(TxMetadata::completion_timestamp(&chunk, 256, 24), None);
    }

    #[test]
    fn completion_read_back() {
        let mut chunk = [0u8; 512];
        TxMetadata::request_timestamp(&mut chunk, 300, 16).unwrap();
        // The driver writes completion.tx_timestamp at offset 8 of the struct.
        chunk[300 - 16 + 8..300].copy_from_slice(&0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(TxMetadata::completion_timestamp(&chunk, 300, 16), Some(0x1122_3344_5566_7788));
        // Without the request flag the word means nothing.
        chunk[300 - 16..300 - 8].fill(0);
        assert_eq!(TxMetadata::completion_timestamp(&chunk, 300, 16), None);
    }

    #[test]
    fn refuses_without_room_or_metadata() {
        let mut chunk = [0u8; 64];
        assert_eq!(TxMetadata::request_timestamp(&mut chunk, 10, 24), None);
        assert_eq!(TxMetadata::request_timestamp(&mut chunk, 40, 0), None);
        assert_eq!(TxMetadata::request_timestamp(&mut chunk, 40, 8), None);
        assert_eq!(TxMetadata::request_timestamp(&mut chunk, 100, 24), None);
        assert_eq!(chunk, [0u8; 64]);
        assert_eq!(TxMetadata::completion_timestamp(&chunk, 10, 24), None);
    }

    #[test]
    fn larger_area_keeps_struct_at_its_start() {
        let mut chunk = [0xffu8; 512];
        TxMetadata::request_timestamp(&mut chunk, 256, 64).unwrap();
        assert_eq!(&chunk[192..200], &1u64.to_ne_bytes());
        assert_eq!(&chunk[200..216], &[0u8; 16]);
        assert_eq!(chunk[216], 0xff, "padding after the struct untouched");
    }
}
