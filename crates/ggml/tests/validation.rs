//! Calls ggml would abort on (killing this test process) must come back as errors instead.

use ggml::{Backend, ComputeBuffer, Context, DType, Error, RopeParams};

fn ctx() -> Context {
    Context::with_data(64, 1 << 20).unwrap()
}

#[test]
fn mul_mat_refuses_mismatched_and_transposed_operands() {
    let ctx = ctx();
    let a = ctx.new_tensor(DType::F32, &[64, 8]).unwrap();
    let b = ctx.new_tensor(DType::F32, &[32, 4]).unwrap();
    assert!(matches!(ctx.mul_mat(a, b), Err(Error::Shape { op: "mul_mat", .. })));
    let at = ctx.transpose(a).unwrap();
    let b2 = ctx.new_tensor(DType::F32, &[8, 4]).unwrap();
    assert!(ctx.mul_mat(at, b2).is_err(), "transposed src0 must be refused");
    let q = ctx.new_tensor(DType::Q8_0, &[64, 8]).unwrap();
    let bf16 = ctx.new_tensor(DType::F16, &[64, 4]).unwrap();
    assert!(matches!(ctx.mul_mat(q, bf16), Err(Error::Type { .. })));
    let ids = ctx.new_tensor(DType::I32, &[64, 8]).unwrap();
    let b3 = ctx.new_tensor(DType::F32, &[64, 4]).unwrap();
    assert!(ctx.mul_mat(ids, b3).is_err());
}

#[test]
fn quantized_tensors_cannot_be_transposed_or_partially_blocked() {
    let ctx = ctx();
    let q = ctx.new_tensor(DType::Q4_0, &[64, 8]).unwrap();
    // cont(transpose(q)) segfaults inside ggml: both halves are refused.
    assert!(ctx.transpose(q).is_err());
    assert!(matches!(ctx.new_tensor(DType::Q4_0, &[48, 2]), Err(Error::BlockAlignment { .. })));
    assert!(matches!(ctx.view(q, &[16, 8], &[36], 0), Err(Error::BlockAlignment { .. })));
    let f = ctx.new_tensor(DType::F32, &[48, 2]).unwrap();
    let dst = ctx.new_tensor(DType::Q8_0, &[32, 3]).unwrap();
    assert!(ctx.cpy(f, dst).is_err(), "rows of 48 quantized into rows of 32");
}

#[test]
fn views_and_reshapes_stay_inside_their_source() {
    let ctx = ctx();
    let a = ctx.new_tensor(DType::F32, &[16, 4]).unwrap();
    assert!(ctx.view(a, &[16, 4], &[64], 4).is_err(), "one float past the end");
    assert!(ctx.view(a, &[16, 5], &[64], 0).is_err());
    assert!(ctx.view(a, &[16, 3], &[64], 64).is_ok());
    // Rows that overlap span fewer bytes than the source but their dense size does not fit: ggml
    // asserts (and aborts the process) on such a view, so the wrapper refuses it.
    assert!(ctx.view(a, &[32, 3], &[64], 0).is_err(), "overlapping windows");
    assert!(ctx.view(a, &[8, 4, 2], &[32, 128], 0).is_ok(), "a strided view whose dense size fits");
    assert!(ctx.reshape(a, &[10, 7]).is_err());
    let t = ctx.permute(a, [1, 0, 2, 3]).unwrap();
    assert!(ctx.reshape(t, &[64]).is_err(), "non-contiguous reshape");
    assert!(ctx.permute(a, [0, 0, 2, 3]).is_err());
    assert!(ctx.new_tensor(DType::F32, &[0, 3]).is_err());
    assert!(ctx.new_tensor(DType::F32, &[1, 2, 3, 4, 5]).is_err());
    assert!(ctx.new_tensor(DType::F32, &[1 << 40, 1 << 30]).is_err());
}

#[test]
fn attention_refuses_inconsistent_heads_and_masks() {
    let ctx = ctx();
    let q = ctx.new_tensor(DType::F32, &[64, 3, 4]).unwrap();
    let k = ctx.new_tensor(DType::Q8_0, &[64, 10, 3]).unwrap();
    let v = ctx.new_tensor(DType::Q8_0, &[64, 10, 3]).unwrap();
    assert!(ctx.flash_attn_ext(q, k, v, None, 0.125).is_err(), "4 heads over 3 kv heads");
    let k2 = ctx.new_tensor(DType::F16, &[32, 10, 2]).unwrap();
    let v2 = ctx.new_tensor(DType::F16, &[32, 10, 2]).unwrap();
    assert!(ctx.flash_attn_ext(q, k2, v2, None, 0.125).is_err(), "head dims differ");
    let k3 = ctx.new_tensor(DType::F16, &[64, 10, 2]).unwrap();
    let v3 = ctx.new_tensor(DType::F16, &[64, 9, 2]).unwrap();
    assert!(ctx.flash_attn_ext(q, k3, v3, None, 0.125).is_err(), "k and v cell counts differ");
    let v4 = ctx.new_tensor(DType::F16, &[64, 10, 2]).unwrap();
    let short_mask = ctx.new_tensor(DType::F16, &[10, 2]).unwrap();
    assert!(ctx.flash_attn_ext(q, k3, v4, Some(short_mask), 0.125).is_err(), "mask has fewer rows than queries");
    let f32_mask = ctx.new_tensor(DType::F32, &[10, 3]).unwrap();
    assert!(ctx.flash_attn_ext(q, k3, v4, Some(f32_mask), 0.125).is_err());
    let mask = ctx.new_tensor(DType::F16, &[10, 3]).unwrap();
    assert!(ctx.flash_attn_ext(q, k3, v4, Some(mask), 0.125).is_ok());
}

#[test]
fn row_stores_lookups_and_rope_check_their_operands() {
    let ctx = ctx();
    let cache = ctx.new_tensor(DType::Q8_0, &[64, 16]).unwrap();
    let rows = ctx.new_tensor(DType::F32, &[64, 3]).unwrap();
    let idx = ctx.new_tensor(DType::I64, &[2]).unwrap();
    assert!(ctx.set_rows(cache, rows, idx).is_err(), "3 rows, 2 indices");
    let idx_f = ctx.new_tensor(DType::F32, &[3]).unwrap();
    assert!(ctx.set_rows(cache, rows, idx_f).is_err());
    let wide = ctx.new_tensor(DType::F32, &[96, 3]).unwrap();
    let idx3 = ctx.new_tensor(DType::I64, &[3]).unwrap();
    assert!(ctx.set_rows(cache, wide, idx3).is_err());

    let table = ctx.new_tensor(DType::F32, &[8, 10]).unwrap();
    let float_ids = ctx.new_tensor(DType::F32, &[2]).unwrap();
    assert!(ctx.get_rows(table, float_ids).is_err());

    let x = ctx.new_tensor(DType::F32, &[64, 2, 5]).unwrap();
    let pos = ctx.new_tensor(DType::I32, &[4]).unwrap();
    let params = RopeParams { n_dims: 64, ..Default::default() };
    assert!(ctx.rope_ext(x, pos, None, &params).is_err(), "4 positions for 5 tokens");
    let pos5 = ctx.new_tensor(DType::I32, &[5]).unwrap();
    assert!(ctx.rope_ext(x, pos5, None, &RopeParams { n_dims: 65, ..params }).is_err());
    let factors = ctx.new_tensor(DType::F32, &[8]).unwrap();
    assert!(ctx.rope_ext(x, pos5, Some(factors), &params).is_err(), "8 factors for 32 pairs");
    assert!(ctx.rms_norm(ctx.new_tensor(DType::F16, &[8]).unwrap(), 1e-5).is_err());
    let a = ctx.new_tensor(DType::F32, &[8, 3]).unwrap();
    let b = ctx.new_tensor(DType::F32, &[3, 8]).unwrap();
    assert!(ctx.add(a, b).is_err());
    assert!(ctx.swiglu(a, b).is_err());
}

#[test]
fn data_io_checks_sizes_and_graphs_check_allocation() {
    let ctx = ctx();
    let t = ctx.new_tensor(DType::F32, &[4]).unwrap();
    assert!(matches!(t.write_f32(&[1.0; 5]), Err(Error::DataSize { .. })));
    assert!(t.write_i32(&[1; 4]).is_err(), "i32 into an f32 tensor");

    // A header-only graph context: computing before allocation must be an error, not a null write.
    let weights = ctx.new_tensor(DType::F32, &[4, 4]).unwrap();
    weights.write_f32(&[0.5; 16]).unwrap();
    let mut compute = ComputeBuffer::new().unwrap();
    let gctx = compute.context(8, 16).unwrap();
    let x = gctx.new_tensor(DType::F32, &[4, 1]).unwrap().set_input();
    assert!(matches!(x.write_f32(&[1.0; 4]), Err(Error::NotAllocated { .. })));
    let y = gctx.mul_mat(weights, x).unwrap();
    let mut graph = gctx.new_graph(16).unwrap();
    graph.expand(y).unwrap();
    let backend = Backend::cpu(1).unwrap();
    assert!(backend.compute(&graph).is_err());
    gctx.allocate(&graph).unwrap();
    assert!(gctx.allocate(&graph).is_err(), "a second allocation could move the first graph's memory");
    x.write_f32(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    backend.compute(&graph).unwrap();
    assert_eq!(y.read_f32().unwrap(), vec![5.0; 4]);

    // Graphs and arenas report overflow instead of aborting.
    let small = Context::for_graph(2, 4).unwrap();
    let a = small.new_tensor(DType::F32, &[4]).unwrap();
    let b = small.new_tensor(DType::F32, &[4]).unwrap();
    assert!(small.new_tensor(DType::F32, &[4]).is_err(), "arena holds 2 tensors");
    let _ = (a, b);
    let gctx = Context::for_graph(16, 4).unwrap();
    let mut v = gctx.new_tensor(DType::F32, &[4]).unwrap();
    for _ in 0..6 {
        v = gctx.scale(v, 2.0).unwrap();
    }
    let mut g = gctx.new_graph(4).unwrap();
    assert!(matches!(g.expand(v), Err(Error::GraphFull { .. })));
    assert!(Backend::cpu(0).is_err());
}

#[test]
fn a_full_arena_refuses_ops_instead_of_aborting() {
    // Room for a few headers only: ggml would abort the process on the first op past it.
    let ctx = Context::new(ggml::ContextParams { mem_size: 5 * ggml::tensor_overhead(), no_alloc: true }).unwrap();
    let a = ctx.new_tensor(DType::F32, &[8, 4]).unwrap();
    let mut refused = None;
    for i in 0..8 {
        let made = match i % 3 {
            0 => ctx.reshape(a, &[32]),
            1 => ctx.view(a, &[8, 2], &[a.strides()[1]], 0),
            _ => ctx.add(a, a),
        };
        if let Err(e) = made {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("the arena ran out");
    assert!(matches!(e, Error::Allocation { .. }), "{e}");
}
