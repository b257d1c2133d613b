//! Codec micro-benchmarks: encode and decode data frames of 64 KiB, 1 MiB and
//! 4 MiB. The zero-copy property of decoding is asserted here once per size
//! (and tested in `tests/wire/zero_copy.rs`).

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ferry_wire::{Codec, Data, Deframer, Frame};

const SIZES: [usize; 3] = [64 << 10, 1 << 20, 4 << 20];

fn data_frame(len: usize) -> Frame {
    let payload = Bytes::from((0..len).map(|i| (i * 7 + i / 4096) as u8).collect::<Vec<u8>>());
    Frame::Data(Data { disk: 1, chunk: 42, logical_len: len as u32, codec: Codec::None, digest: [9; 32], payload })
}

fn label(len: usize) -> String {
    if len >= 1 << 20 {
        format!("{}MiB", len >> 20)
    } else {
        format!("{}KiB", len >> 10)
    }
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_data");
    for len in SIZES {
        let frame = data_frame(len);
        let Frame::Data(data) = &frame else { unreachable!() };
        g.throughput(Throughput::Bytes(len as u64));
        let mut buf = BytesMut::with_capacity(len + 128);
        // Whole frame into one buffer: copies the payload once.
        g.bench_with_input(BenchmarkId::new("frame_copy", label(len)), &frame, |b, f| {
            b.iter(|| {
                buf.clear();
                f.encode(&mut buf);
                std::hint::black_box(buf.len())
            })
        });
        // Head only, for a vectored write of head + payload: no copy.
        g.bench_with_input(BenchmarkId::new("head_vectored", label(len)), data, |b, d| {
            b.iter(|| {
                buf.clear();
                d.encode_head(&mut buf);
                std::hint::black_box((buf.len(), d.payload.clone()))
            })
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_data");
    for len in SIZES {
        let wire = data_frame(len).to_bytes();
        g.throughput(Throughput::Bytes(len as u64));
        let filled = || {
            let mut d = Deframer::new();
            d.buffer_mut().extend_from_slice(&wire);
            d
        };
        // Not timed: the payload is a slice of the receive buffer.
        let mut d = filled();
        let (start, end) = (d.buffer_mut().as_ptr() as usize, d.buffer_mut().as_ptr() as usize + wire.len());
        let Ok(Some(Frame::Data(got))) = d.next_frame() else { panic!("not a data frame") };
        let p = got.payload.as_ptr() as usize;
        assert!(p >= start && p + got.payload.len() <= end, "decoding copied the payload");
        // Timed: header check, field parsing, payload split (the socket read into the buffer is not timed).
        g.bench_function(BenchmarkId::new("deframer", label(len)), |b| {
            b.iter_batched(filled, |mut d| d.next_frame().unwrap(), BatchSize::LargeInput)
        });
        // Timed with the copy into the receive buffer, as a socket read into `buffer_mut` would do.
        g.bench_function(BenchmarkId::new("push_and_deframe", label(len)), |b| {
            b.iter_batched(
                Deframer::new,
                |mut d| {
                    d.push(&wire);
                    d.next_frame().unwrap()
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, encode, decode);
criterion_main!(benches);
