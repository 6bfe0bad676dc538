"The no-model ceiling, for `make bench` only: FastAPI parses the body (orjson) and answers a constant."
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

app = FastAPI(title='no-model constant')
ONE = orjson.dumps({'prediction': 'legit', 'fraud_probability': 0.0, 'model_version': 'constant'})


@app.post('/predict')
async def predict(request: Request):
    rows = orjson.loads(await request.body())['features']
    return Response(ONE if len(rows) == 30 else b'{}', media_type='application/json')


@app.post('/predict/batch')
async def predict_batch(request: Request):
    rows = orjson.loads(await request.body())['instances']
    one = {'prediction': 'legit', 'fraud_probability': 0.0}
    return Response(orjson.dumps({'model_version': 'constant', 'predictions': [one] * len(rows)}), media_type='application/json')
