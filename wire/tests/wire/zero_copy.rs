//! Decoding a data frame does not copy its payload.

use bytes::Bytes;
use ferry_wire::*;

#[test]
fn data_payload_is_a_slice_of_the_receive_buffer() {
    let payload = Bytes::from(vec![0x5Au8; 1 << 20]);
    let frame = Frame::Data(Data {
        disk: 0,
        chunk: 0,
        logical_len: payload.len() as u32,
        codec: Codec::None,
        digest: [0; 32],
        payload: payload.clone(),
    });
    let wire = frame.to_bytes();
    let mut d = Deframer::new();
    // As a socket reader would: bytes land in the deframer's own buffer.
    d.buffer_mut().extend_from_slice(&wire);
    let buf = d.buffer_mut();
    let (start, end) = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len());
    let Some(Frame::Data(got)) = d.next_frame().unwrap() else { panic!("not a data frame") };
    let p = got.payload.as_ptr() as usize;
    assert!(p >= start && p + got.payload.len() <= end, "payload was copied out of the receive buffer");
    assert_eq!(p, start + HEADER_LEN + DATA_FIXED_LEN);
    assert_eq!(got.payload, payload);
}

#[test]
fn data_payload_is_not_copied_through_a_session() {
    let (mut c, mut s) = crate::checks::drive(4);
    let payload = Bytes::from(vec![7u8; crate::checks::CHUNK as usize]);
    let f = Frame::Data(Data {
        disk: 0,
        chunk: 0,
        logical_len: payload.len() as u32,
        codec: Codec::None,
        digest: [0; 32],
        payload,
    });
    c.send(&f).unwrap();
    let out = c.take_transmit().unwrap();
    s.buffer_mut().extend_from_slice(&out);
    let start = s.buffer_mut().as_ptr() as usize;
    let end = start + s.buffer_mut().len();
    let Some(Event::Frame(Frame::Data(got))) = s.poll_event().unwrap() else { panic!("no data event") };
    let p = got.payload.as_ptr() as usize;
    assert!(p >= start && p + got.payload.len() <= end);
}
