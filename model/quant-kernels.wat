;; int8 absmax block quantization (model/quantize.ts) in WebAssembly SIMD, 4 weights per step (no calls in the loops:
;; V8 does not inline WebAssembly functions, and a call per 4 weights cost a third of the time).
;; Same codes and scales as int8BlocksF16 / int8BlocksF32 (model/quantize.ts), bit for bit (test/quant-kernels.test.ts):
;;   scale = fl32(amax / 127), inv = scale ? fl32(1 / scale) : 0, code = round-half-away(fl32(x · inv)) + 128,
;; NaN weights are skipped by amax and coded 128; every f32 product and quotient here is rounded once, as
;; Math.fround of the double result is. Rounding: f32x4.nearest rounds half to even, so a lane exactly halfway (|y − r|
;; = 0.5, exact here) takes y + copysign(0.5, y) instead, exact for such y; a NaN lane truncates to 0, code 128.
;; Blocks are whole: blockSize a multiple of 16, rows a multiple of blockSize.
;; Regenerate model/quant-kernels.wasm.ts after an edit: npm run build:wasm.
(module
  (memory (export "memory") 1)

  ;; A finite half's magnitude bits (≤ 0x7c00, infinity) as a float32.
  (func $half (param $a i32) (result f32)
    (if (result f32) (i32.eq (local.get $a) (i32.const 0x7c00))
      (then (f32.const inf))
      (else (f32.mul (f32.reinterpret_i32 (i32.shl (local.get $a) (i32.const 13))) (f32.const 0x1p112)))))

  (func $inverse (param $scale f32) (result v128)
    (f32x4.splat (select (f32.div (f32.const 1) (local.get $scale)) (f32.const 0) (f32.ne (local.get $scale) (f32.const 0)))))

  ;; `blocks` blocks of `bs` binary16 weights at `src` → bs codes each at `codes`, one float32 scale each at `scales`.
  (func (export "q8f16") (param $src i32) (param $blocks i32) (param $bs i32) (param $codes i32) (param $scales i32)
    (local $end i32) (local $p i32) (local $amax v128) (local $v v128) (local $scale f32) (local $inv v128)
    (local $x v128) (local $mag v128) (local $y v128) (local $r v128) (local $c v128)
    (block $done
      (loop $block
        (br_if $done (i32.eqz (local.get $blocks)))
        (local.set $end (i32.add (local.get $src) (i32.shl (local.get $bs) (i32.const 1))))
        ;; amax on the bits: |x| orders like its bits with the sign cleared; NaNs (above infinity's bits) skipped.
        (local.set $amax (v128.const i32x4 0 0 0 0))
        (local.set $p (local.get $src))
        (loop $scan
          (local.set $v (v128.and (v128.load (local.get $p)) (v128.const i16x8 0x7fff 0x7fff 0x7fff 0x7fff 0x7fff 0x7fff 0x7fff 0x7fff)))
          (local.set $amax (i16x8.max_s (local.get $amax)
            (v128.andnot (local.get $v) (i16x8.gt_s (local.get $v) (v128.const i16x8 0x7c00 0x7c00 0x7c00 0x7c00 0x7c00 0x7c00 0x7c00 0x7c00)))))
          (local.set $p (i32.add (local.get $p) (i32.const 16)))
          (br_if $scan (i32.lt_u (local.get $p) (local.get $end))))
        (local.set $amax (i16x8.max_s (local.get $amax) (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $amax) (local.get $amax))))
        (local.set $amax (i16x8.max_s (local.get $amax) (i8x16.shuffle 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 (local.get $amax) (local.get $amax))))
        (local.set $amax (i16x8.max_s (local.get $amax) (i8x16.shuffle 2 3 0 1 2 3 0 1 2 3 0 1 2 3 0 1 (local.get $amax) (local.get $amax))))
        (local.set $scale (f32.div (call $half (i16x8.extract_lane_u 0 (local.get $amax))) (f32.const 127)))
        (f32.store (local.get $scales) (local.get $scale))
        (local.set $inv (call $inverse (local.get $scale)))
        (local.set $p (local.get $src))
        ;; 4 weights a step. A half's value, exactly: its magnitude bits moved into a float32's place and scaled by
        ;; 2^112 (subnormal halves included); infinities and NaNs, which that makes finite, are coded 128 below, as
        ;; the reference codes them (an infinite amax makes inv 0, and ∞·0 is NaN).
        (loop $quant
          (local.set $x (i32x4.extend_low_i16x8_u (v128.load64_zero (local.get $p))))
          (local.set $mag (v128.and (local.get $x) (v128.const i32x4 0x7fff 0x7fff 0x7fff 0x7fff)))
          (local.set $y
            (f32x4.mul
              (f32x4.mul
                (v128.or (i32x4.shl (local.get $mag) (i32.const 13))
                         (i32x4.shl (v128.and (local.get $x) (v128.const i32x4 0x8000 0x8000 0x8000 0x8000)) (i32.const 16)))
                (v128.const i32x4 0x77800000 0x77800000 0x77800000 0x77800000))
              (local.get $inv)))
          (local.set $r (f32x4.nearest (local.get $y)))
          (local.set $r
            (v128.bitselect
              (f32x4.add (local.get $y) (v128.or (v128.and (local.get $y) (v128.const i32x4 0x80000000 0x80000000 0x80000000 0x80000000)) (v128.const f32x4 0.5 0.5 0.5 0.5)))
              (local.get $r)
              (f32x4.eq (f32x4.abs (f32x4.sub (local.get $y) (local.get $r))) (v128.const f32x4 0.5 0.5 0.5 0.5))))
          (local.set $c (i32x4.trunc_sat_f32x4_s (local.get $r)))
          (local.set $c (v128.andnot (local.get $c) (i32x4.gt_s (local.get $mag) (v128.const i32x4 0x7bff 0x7bff 0x7bff 0x7bff))))
          (local.set $c (i32x4.add (local.get $c) (v128.const i32x4 128 128 128 128)))
          (local.set $c (i16x8.narrow_i32x4_s (local.get $c) (local.get $c)))
          (v128.store32_lane 0 (local.get $codes) (i8x16.narrow_i16x8_u (local.get $c) (local.get $c)))
          (local.set $codes (i32.add (local.get $codes) (i32.const 4)))
          (local.set $p (i32.add (local.get $p) (i32.const 8)))
          (br_if $quant (i32.lt_u (local.get $p) (local.get $end))))
        (local.set $src (local.get $end))
        (local.set $scales (i32.add (local.get $scales) (i32.const 4)))
        (local.set $blocks (i32.sub (local.get $blocks) (i32.const 1)))
        (br $block))))

  ;; The same over float32 weights. amax by pmax (a < b ? b : a), which keeps the running amax over a NaN.
  (func (export "q8f32") (param $src i32) (param $blocks i32) (param $bs i32) (param $codes i32) (param $scales i32)
    (local $end i32) (local $p i32) (local $amax v128) (local $scale f32) (local $inv v128) (local $y v128) (local $r v128) (local $c v128)
    (block $done
      (loop $block
        (br_if $done (i32.eqz (local.get $blocks)))
        (local.set $end (i32.add (local.get $src) (i32.shl (local.get $bs) (i32.const 2))))
        (local.set $amax (v128.const i32x4 0 0 0 0))
        (local.set $p (local.get $src))
        (loop $scan
          (local.set $amax (f32x4.pmax (local.get $amax) (f32x4.abs (v128.load (local.get $p)))))
          (local.set $p (i32.add (local.get $p) (i32.const 16)))
          (br_if $scan (i32.lt_u (local.get $p) (local.get $end))))
        (local.set $amax (f32x4.pmax (local.get $amax) (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $amax) (local.get $amax))))
        (local.set $amax (f32x4.pmax (local.get $amax) (i8x16.shuffle 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 (local.get $amax) (local.get $amax))))
        (local.set $scale (f32.div (f32x4.extract_lane 0 (local.get $amax)) (f32.const 127)))
        (f32.store (local.get $scales) (local.get $scale))
        (local.set $inv (call $inverse (local.get $scale)))
        (local.set $p (local.get $src))
        (loop $quant
          (local.set $y (f32x4.mul (v128.load (local.get $p)) (local.get $inv)))
          (local.set $r (f32x4.nearest (local.get $y)))
          (local.set $r
            (v128.bitselect
              (f32x4.add (local.get $y) (v128.or (v128.and (local.get $y) (v128.const i32x4 0x80000000 0x80000000 0x80000000 0x80000000)) (v128.const f32x4 0.5 0.5 0.5 0.5)))
              (local.get $r)
              (f32x4.eq (f32x4.abs (f32x4.sub (local.get $y) (local.get $r))) (v128.const f32x4 0.5 0.5 0.5 0.5))))
          (local.set $c (i32x4.trunc_sat_f32x4_s (local.get $r)))
          (local.set $c (i32x4.add (local.get $c) (v128.const i32x4 128 128 128 128)))
          (local.set $c (i16x8.narrow_i32x4_s (local.get $c) (local.get $c)))
          (v128.store32_lane 0 (local.get $codes) (i8x16.narrow_i16x8_u (local.get $c) (local.get $c)))
          (local.set $codes (i32.add (local.get $codes) (i32.const 4)))
          (local.set $p (i32.add (local.get $p) (i32.const 16)))
          (br_if $quant (i32.lt_u (local.get $p) (local.get $end))))
        (local.set $src (local.get $end))
        (local.set $scales (i32.add (local.get $scales) (i32.const 4)))
        (local.set $blocks (i32.sub (local.get $blocks) (i32.const 1)))
        (br $block)))))
